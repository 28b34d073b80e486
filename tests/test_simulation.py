"""Seeded simulations: the engine alone (fast) and whole nodes (runner, disk store, KV store).

Each test runs a block of seeds of one profile and fails with a line per failing seed, each with
the command that reproduces it (`python -m aether.testing.sim --seed N --profile P -v`).
AETHER_SIM_SEEDS=N scales the total (default 600 seeds across profiles, for the suite's time
budget; CI must run at least 500, issue 2; sweeps of thousands: `python -m aether.testing.sim`).
Deliberately broken engines, stores, runners and session tables (`aether.testing.mutants`) must
be caught within a bounded number of seeds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aether.consensus import engine as engine_mod
from aether.consensus.engine import EngineConfig
from aether.testing.mutants import MUTANTS
from aether.testing.nodesim import (
    World,
    run_node_seed,
)
from aether.testing.sim import (
    InvariantViolation,
    Simulation,
    check_history,
    profile_for,
    repro_command,
    run_one,
    run_seed,
)

TOTAL = int(os.environ.get("AETHER_SIM_SEEDS", "600"))
# share of the seeds per profile (engine-only seeds take ~30 ms, node seeds 60-150 ms)
SHARES = {"engine": 0.27, "members": 0.03, "ci": 0.35, "node-members": 0.03, "aggressive": 0.10,
          "disk": 0.08, "partitions": 0.05, "five": 0.05, "sessions": 0.04}
BLOCK = 25


def _blocks() -> list[tuple[str, int, int]]:
    out = []
    for profile, share in SHARES.items():
        n = max(BLOCK, round(TOTAL * share))
        for start in range(0, n, BLOCK):
            out.append((profile, start, min(start + BLOCK, n)))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("profile", "lo", "hi"), _blocks(), ids=lambda x: str(x))
def test_seeds_are_safe_live_and_consistent(profile: str, lo: int, hi: int) -> None:
    failures = []
    for seed in range(lo, hi):
        ok, kind, msg = run_one(seed, profile)
        if not ok:
            failures.append(f"seed {seed} [{kind}] {msg.splitlines()[0][:400]}\n  reproduce: "
                            f"{repro_command(seed, profile)}")
    assert not failures, "\n".join(failures)


def test_total_seed_count_is_at_least_the_requested_one() -> None:
    assert sum(hi - lo for _, lo, hi in _blocks()) >= TOTAL


# --- mutants: every invariant catches a broken component within a bounded number of seeds ---------

# seeds each mutant may take (measured: most are caught by their first seed; see the report)
MUTANT_BUDGET = {
    "d1": 30, "forget-journal": 5, "drop-kept": 30, "no-fsync-wait": 3, "no-fsync-wait-wire": 30,
    "ignore-write-errors": 10, "load-unsynced": 20,
    "release-all": 3, "substitute": 5, "session-next": 5, "no-sessions": 10, "local-reads": 60,
    "no-retransmit": 3, "member-skew": 5, "quorum-from-config": 5, "join-replays": 30,
}


# Where a mutant's seeds start: 'load-unsynced' needs a kill while decisions are in the page
# cache only, then a restart that answers a lagging peer, then a power cut: a few aggressive
# seeds in 100 (measured: 11 of the first 300 after the engine combined proposals; 3 of the
# first 200, seeds 63, 77 and 143, since issue 19's seal at the exchange changed the timing).
MUTANT_FIRST_SEED = {"load-unsynced": 60}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_simulation_catches_the_mutant(name: str) -> None:
    m = MUTANTS[name]
    first = MUTANT_FIRST_SEED.get(name, 0)
    with m.patch():
        for seed in range(first, first + MUTANT_BUDGET[name]):
            ok, _, msg = run_one(seed, m.profile, setup=m.setup)
            if not ok:
                # caught by an invariant, not by the mutant crashing the simulation
                assert "simulation error" not in msg, msg
                return
    pytest.fail(f"mutant {name!r} ({m.breaks}) survived {MUTANT_BUDGET[name]} seeds of profile {m.profile}")


def test_every_mutant_has_a_budget() -> None:
    assert set(MUTANT_BUDGET) == set(MUTANTS)


@pytest.mark.timeout(300)
def test_engine_only_simulation_catches_a_broken_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deciding on a single vote (D = 1) is unsafe; the engine-only harness notices too."""
    orig = engine_mod.Engine.__init__

    def broken(self, *a, **k):  # type: ignore[no-untyped-def]
        orig(self, *a, **k)
        self.D = 1

    monkeypatch.setattr(engine_mod.Engine, "__init__", broken)
    # the first seed that catches it is enough (measured: seed 6, and 19 of the first 80)
    for seed in range(80):
        try:
            _, res = run_seed(seed)
        except InvariantViolation:
            return
        if not res.ok:
            return
    pytest.fail("80 seeds of the engine-only simulation did not catch an engine deciding on one vote")


# --- the session table ------------------------------------------------------------------------------


def test_kvstore_incarnations_reusing_one_session_are_caught() -> None:
    """The old bug as a mutant: KVStore used session `kv-{node_id}` with sequence numbers from 1
    in every incarnation, so after a restart its commands were refused as stale or answered from
    the cache of an earlier command. The simulation catches it within a few seeds, as a refusal
    or as the list-append checker's stale read (a read answered from an earlier read's cache)."""

    def legacy(w: World) -> None:
        w.sc.kv_sessions = "legacy"

    for seed in range(5):
        out = run_node_seed(seed, "sessions", setup=legacy)
        if not out.ok:
            assert out.error is not None, out
            assert "refused" in out.error or "(stale read)" in out.error, out.error
            return
    pytest.fail("five seeds did not catch KVStore sessions reused across incarnations")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("lo", range(0, 50, 25))
def test_eviction_profile(lo: int) -> None:
    """Sessions evicted while in use: no command runs twice, every client finishes, and the
    seeds really exercise eviction (the store refused forgotten sessions)."""
    failures, refusals = [], 0
    for seed in range(lo, lo + 25):
        out = run_node_seed(seed, "eviction")
        refusals += out.world.stats["session_refusals"]
        if not out.ok:
            failures.append(f"seed {seed} {out.error}\n  reproduce: {repro_command(seed, 'eviction')}")
    assert not failures, "\n".join(failures)
    assert refusals >= 25, f"only {refusals} session refusals in 25 seeds: eviction is not exercised"


# --- reproducibility ---------------------------------------------------------------------------------


def test_a_seed_reproduces_exactly_in_another_process() -> None:
    """Same seed, same run: even with another hash seed (no set or dict order leaks in)."""
    code = ("from aether.testing.nodesim import run_node_seed\n"
            "print(run_node_seed(3, 'aggressive').world.fingerprint())\n")
    prints = set()
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True)
        prints.add(out.stdout.strip())
    here = run_node_seed(3, "aggressive").world.fingerprint()
    assert prints == {here}


def test_cli_prints_a_repro_line_per_failure_and_a_summary() -> None:
    from aether.testing import sim

    out = subprocess.run(
        [sys.executable, "-m", "aether.testing.sim", "--seeds", "0:2", "--profile", "ci",
         "--mutant", "no-fsync-wait"], capture_output=True, text=True,
    )
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[1].strip() == f"reproduce: {sim.repro_command(0, 'ci')} --mutant no-fsync-wait"
    assert lines[-1].startswith("profile=ci seeds=0:2 ran=2 ok=0 failed=2 (safety=2 liveness=0 history=0)")


# --- membership changes -----------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("nodes", [3, 5])
def test_membership_changes_under_faults_keep_agreement_and_linearizability(nodes: int) -> None:
    """Profile 'members' with the node count forced: spares join and are added, members are
    removed (and re-added), some changes are followed at once by a crash (of the node that took
    the change, the node it is about, or another) or a partition; every seed must change the member
    set at least once on the whole, and stay safe, live and linearizable."""
    from aether.testing.sim import run_member_seed

    ok_changes = 0
    failures = []
    for seed in range(10):
        try:
            sim, res = run_member_seed(seed, nodes)
        except InvariantViolation as e:
            failures.append(f"seed {seed}: {e}")
            continue
        if not res.ok:
            failures.append(f"seed {seed}: history not linearizable: {res.explanation}")
        ok_changes += sim.change_stats["ok"]
    assert not failures, "\n".join(failures)
    assert ok_changes >= 10


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["member-skew", "quorum-from-config"])
def test_whole_node_simulation_catches_member_mutants_too(name: str) -> None:
    """The whole-node profile 'node-members' catches broken member-set handling as well (and the
    run ends: a violation raised inside a runner callback once left a client waiting forever)."""
    m = MUTANTS[name]
    with m.patch():
        for seed in range(5):
            ok, _, msg = run_one(seed, "node-members")
            if not ok:
                assert "simulation error" not in msg, msg
                return
    pytest.fail(f"mutant {name!r} survived 5 seeds of profile node-members")


@pytest.mark.timeout(300)
def test_five_nodes_sealing_at_the_exchange_under_loss_and_delay() -> None:
    """Issue 19: batches sealed when a replica's exchange completes (beyond the in-flight budget)
    keep agreement and linearizability with 5 replicas under the engine profile's drops,
    duplicates, delays, partitions and crashes. A budget of one batch and 10 clients make the
    exchange seal frequent; the late-message grace is at its default."""
    sealed = 0
    failures = []
    for seed in range(40):
        _, prof = profile_for(seed)
        config = EngineConfig(
            retransmit_after=0.02,
            commit_timeout=2.0,
            snapshot_every=40,
            retain_slots=30,
            catchup_entries=16,
            dedup_slots=100_000,
            max_inflight_batches=1,
        )
        sim = Simulation(seed, 5, clients=10, ops_per_client=20, faults=prof, engine_config=config)
        try:
            res = check_history(sim.run())
        except InvariantViolation as e:
            failures.append(f"seed {seed}: {str(e)[:300]}")
            continue
        if not res.ok:
            failures.append(f"seed {seed}: history not linearizable: {res.explanation}")
        sealed += sum(n.engine.stats["exchange_seals"] for n in sim.nodes.values() if n.engine is not None)
    assert not failures, "\n".join(failures)
    assert sealed > 0  # the path under test ran
