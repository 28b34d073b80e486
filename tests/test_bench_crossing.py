"""`bench/crossing_bench.py` runs (briefly) and its RESULT line holds every figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_crossing_benchmark_measures_all_three_ways() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crossing_bench.py"), "--seconds", "0.2", "--conc", "4"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout
    fields = dict(kv.split("=") for kv in last.removeprefix("RESULT ").split())
    for mode in ("single", "batched", "inline"):
        assert float(fields[f"{mode}_rps"]) > 0 and float(fields[f"{mode}_cpu_us"]) > 0, last
    assert float(fields["single_ctxsw"]) > 0, last  # every single crossing wakes the other loop
    assert fields["pinned"] == "0"


def test_bad_options_are_refused_naming_them() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "crossing_bench.py"), "--seconds", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "--seconds must be > 0" in proc.stderr
