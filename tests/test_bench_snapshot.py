"""`bench/snapshot_bench.py` runs (briefly, against this tree's engine and HEAD's) and its RESULT
line holds every figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "snapshot_bench.py"), *args],
        capture_output=True, text=True, timeout=100, cwd=ROOT, check=False,
    )  # fmt: skip


def test_the_snapshot_benchmark_measures_the_loop_during_a_snapshot() -> None:
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout: --baseline HEAD needs one")
    proc = _run("--records", "3000", "--rounds", "1", "--turn-us", "50", "--baseline", "HEAD")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), proc.stdout
    fields = dict(kv.split("=") for kv in last.removeprefix("RESULT ").split())
    assert fields["records"] == "3000"
    for prefix in ("", "base_"):
        gap_max, gap_p99 = float(fields[f"{prefix}gap_max_ms"]), float(fields[f"{prefix}gap_p99_ms"])
        assert 0 < gap_p99 <= gap_max, last
        assert 0 < float(fields[f"{prefix}finish_ms"]) < float(fields[f"{prefix}snapshot_ms"]), last
    assert float(fields["gap_max_ratio"]) > 0 and float(fields["finish_ratio"]) > 0, last


def test_bad_options_are_refused_naming_them() -> None:
    proc = _run("--records", "0")
    assert proc.returncode == 2 and "--records must be at least 1" in proc.stderr
