"""`bench/order_bench.py` and `bench/map_storage_bench.py`: the parts that run without a cluster.

The order benchmark itself (3 nodes, wrk) is not run here: its blueprint variants must still be
blueprints the nodes accept, and its latency merge must read the right quantiles. The storage
benchmark is small enough to run for real (a few hundred writes, against this tree's own HEAD).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aether.core.maps import MapSpec
from aether.deploy.blueprint import parse_blueprint

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import order_bench  # noqa: E402


def test_the_experiment_variants_of_the_demo_blueprint_parse_and_change_only_what_they_say() -> None:
    text = order_bench.BLUEPRINT_FILE.read_text()
    shipped = parse_blueprint(text, "demo-order.blueprint")
    assert order_bench.blueprint_engine(text) == "log"
    assert order_bench.blueprint_isolation(text) == "shared"
    assert order_bench.with_engine(order_bench.with_isolation(text, None), "log") == text
    own = parse_blueprint(order_bench.with_isolation(text, "thread"), "variant.blueprint")
    assert {s.isolation for s in own.slices} == {"auto"} and len(own.slices) == len(shipped.slices)
    bp = parse_blueprint(
        order_bench.with_engine(order_bench.with_isolation(text, "inline"), "memory"), "variant.blueprint"
    )
    assert {s.isolation for s in bp.slices} == {"inline"} and len(bp.slices) == len(shipped.slices)
    assert dict(bp.maps) == {"orders": MapSpec(3, 2, "memory"), "stock": MapSpec(3, 2, "memory")}
    counts = [(s.artifact, s.instances) for s in shipped.slices]
    assert [(s.artifact, s.instances) for s in bp.slices] == counts


def wrk_output(latencies_us: list[float], requests: int) -> str:
    """What the benchmark's Lua `done` hook prints: 1,000 quantiles and a summary."""
    grid = [latencies_us[min(len(latencies_us) - 1, i * len(latencies_us) // 1000)] for i in range(1000)]
    return (
        "QUANTILES_US " + " ".join(str(v) for v in grid) + "\n"
        f"SUMMARY requests={requests} duration_us=10000000 non2xx=0 socket_errors=0\n"
    )


def test_merge_pools_the_processes_by_request_count_for_every_percentile() -> None:
    fast = wrk_output([1000.0] * 1000, 9_000)  # 1 ms, 90 % of the requests
    slow = wrk_output([float(20_000 + i) for i in range(1000)], 1_000)  # 20-21 ms, the other 10 %
    r = order_bench.merge([fast, slow])
    assert r["rps"] == 1000.0 and r["ok_total"] == 10_000
    assert r["p50_ms"] == 1.0 and r["p90_ms"] == 1.0  # the fast process holds the first 90 %
    assert 20.0 < r["p99_ms"] < r["p999_ms"] <= 21.0


def test_the_storage_benchmark_runs_against_a_git_ref() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "map_storage_bench.py"), "--writes", "300", "--rounds", "1",
         "--baseline", "HEAD"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=") for kv in last.removeprefix("RESULT ").split())
    assert last.startswith("RESULT ") and fields["writes"] == "300"
    for key in ("cpu_us", "kib", "base_cpu_us", "base_kib", "cpu_ratio", "kib_ratio"):
        assert float(fields[key]) > 0, last


def test_the_retry_counters_are_summed_over_their_labels() -> None:
    text = "\n".join([
        "# HELP aether_invoke_retries_total Attempts after a call's first",
        "# TYPE aether_invoke_retries_total counter",
        'aether_invoke_retries_total{node="node-1"} 3.0',
        'aether_map_op_retries_total{map="orders",node="node-1",reason="refused"} 0.0',
        'aether_map_op_retries_total{map="orders",node="node-1",reason="timeout"} 2.0',
        'aether_map_op_retries_total{map="stock",node="node-1",reason="timeout"} 5.0',
        'aether_map_op_retries_created{map="stock",node="node-1",reason="timeout"} 1.7e9',
    ])
    assert order_bench.parse_retries(text) == {"retries": 3.0, "map_retries": 7.0}
    assert order_bench.parse_retries("") == {"retries": 0.0, "map_retries": 0.0}
