"""`bench/limits.py`: its figures (ratios, medians, the RESULT line) and its bare hello server.

The benchmark itself (3 nodes, wrk for minutes) is not run here; the bare server is started as the
benchmark starts it (its own process, free port, killed by PID) and must answer like the hello
example.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import limits  # noqa: E402
from kv_bench import free_ports  # noqa: E402


def fig(rps: float, p50: float, p99: float, cpu: float = 0.0) -> dict[str, float]:
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "cpu_us": cpu, "non2xx": 0.0, "socket_errors": 0.0}


ROUND = {
    "bare_hello": fig(40_000, 1.5, 2.5, 40),
    "hello": fig(30_000, 2.0, 4.0, 60),
    "bare_chain": fig(20_000, 3.0, 5.0, 150),
    "chain": fig(20_000, 3.5, 6.0, 100),
    "remote": fig(24_000, 2.5, 4.5, 90),
}


def test_ratios_follow_the_documented_definitions() -> None:
    r = limits.ratios(ROUND)
    assert r["hello_ratio"] == pytest.approx(0.75)
    assert r["chain_ratio"] == pytest.approx(0.5)  # against the bare app, as the issue states it
    assert r["chain_vs_bare_chain"] == pytest.approx(1.0)
    assert r["p99_ratio"] == pytest.approx(1.6)
    # one hop = 1/20000 - 1/40000 s = 25 us; local minus a hop = 1 / (1/30000 + 25e-6) = 17142.9
    assert r["hop_us"] == pytest.approx(25.0)
    assert r["local_minus_hop_rps"] == pytest.approx(1 / (1 / 30_000 + 25e-6))
    assert r["remote_ratio"] == pytest.approx(24_000 * (1 / 30_000 + 25e-6))
    assert r["remote_p50_goal_ms"] == pytest.approx(2.0 + 1.5)
    assert r["hello_cpu_ratio"] == pytest.approx(1.5)


def test_isolation_inline_goes_into_every_slice_table_of_the_blueprint() -> None:
    assert limits.with_isolation(limits.BLUEPRINT, "thread") == limits.BLUEPRINT
    assert limits.with_isolation(limits.BLUEPRINT, None) == limits.BLUEPRINT
    inline = limits.with_isolation(limits.BLUEPRINT, "inline")
    assert inline.count('isolation = "inline"') == inline.count("[slices.") == 2
    from aether.deploy.blueprint import parse_blueprint

    assert {s.isolation for s in parse_blueprint(inline, "hello.blueprint").slices} == {"inline"}


def test_summary_takes_medians_and_the_result_line_leads_with_the_required_keys() -> None:
    slower = {k: dict(v) for k, v in ROUND.items()}
    slower["hello"]["rps"] = 10_000
    faster = {k: dict(v) for k, v in ROUND.items()}
    faster["hello"]["rps"] = 36_000
    res = limits.summarize([slower, ROUND, faster])
    assert res["hello_rps"] == 30_000
    assert res["hello_ratio"] == pytest.approx(0.75)
    line = limits.result_line({**res, "rounds": 3})
    keys = list(limits.parse_result(line))
    assert keys[: len(limits.RESULT_KEYS)] == list(limits.RESULT_KEYS)
    assert limits.parse_result(line)["rounds"] == "3"
    with pytest.raises(ValueError, match="not a RESULT line"):
        limits.parse_result("hello_ratio=1")


def test_the_bare_hello_server_answers_like_the_hello_example(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    p = subprocess.Popen(
        [sys.executable, str(BENCH / "limits.py"), "--serve", "hello", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        body: Any = None
        while body is None:
            assert p.poll() is None, f"the bare server exited with {p.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/hello/world", timeout=2) as r:
                    assert r.headers["Content-Type"].startswith("application/json")
                    body = json.loads(r.read())
            except OSError:
                assert time.monotonic() < deadline, "the bare server did not answer within 15 s"
                time.sleep(0.05)
        assert body == {"message": "Hello, world!", "node": "bare", "instance": 1}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=5)
