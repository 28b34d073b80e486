"""Deterministic simulation of the real engine under faults, histories checked for linearizability.

Each seed picks 3 or 5 nodes and a fault mix (drops, duplicates, delays/reordering, partitions,
crashes and restarts, crashes part-way through a step). A failing seed reproduces with the
command printed in the assertion message. AETHER_SIM_SEEDS=N runs more seeds.
"""

from __future__ import annotations

import os

import pytest

from aether.consensus import engine as engine_mod
from aether.testing.sim import InvariantViolation, repro_command, run_seed

SEEDS = int(os.environ.get("AETHER_SIM_SEEDS", "500"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(SEEDS))
def test_seed_is_safe_live_and_linearizable(seed: int) -> None:
    try:
        sim, res = run_seed(seed)
    except InvariantViolation as e:
        pytest.fail(f"{e}\nreproduce: {repro_command(seed)}")
    assert res.ok, f"{res.explanation}\nreproduce: {repro_command(seed)}"
    completed = sum(1 for op in sim.history if op.ret is not None)
    assert completed >= sim.n_clients, (
        f"too little progress ({completed} ops); reproduce: {repro_command(seed)}"
    )


@pytest.mark.timeout(300)
def test_simulation_catches_a_broken_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deciding on a single vote (D = 1) is unsafe; the harness must notice within a few seeds."""
    orig = engine_mod.Engine.__init__

    def broken(self, *a, **k):  # type: ignore[no-untyped-def]
        orig(self, *a, **k)
        self.D = 1

    monkeypatch.setattr(engine_mod.Engine, "__init__", broken)
    caught = 0
    for seed in range(80):
        try:
            _, res = run_seed(seed)
        except InvariantViolation:
            caught += 1
            continue
        if not res.ok:
            caught += 1
    assert caught > 0
