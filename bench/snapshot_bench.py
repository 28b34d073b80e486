#!/usr/bin/env python3
"""What a map log snapshot costs the node's event loop (`aether.maps.logstorage`, the ``log`` engine).

A node's loop commits map writes while the log engine rewrites a big log as a snapshot: the
writer thread encodes the live records (holding the interpreter lock for each frame it encodes)
and syncs the file; the first commit after it is done finishes the snapshot on the loop. This
measures what the loop sees, in one process with no network:

- the engine is filled with `--records` records of `--value-size` bytes (1,024 partitions, one
  operation id each, 64 per commit), each written three times (`WRITES`: a map whose records are
  overwritten; the engine does not rewrite a log that is mostly live data), then a snapshot is
  started by the next commit (`compact_min_bytes` lowered to 0);
- meanwhile a uvloop loop runs a busy node's turns: each turn puts and commits `--per-commit`
  records and burns `--turn-us` microseconds of Python work, then yields; the gap between the
  ends of consecutive turns is the loop's lag;
- figures, from the commit that starts the snapshot to the end of the commit that finishes it:
  `gap_max_ms` / `gap_p99_ms` (the longest and the 99th-percentile gap between turns),
  `finish_ms` (the commit that finished the snapshot, on the loop), `snapshot_ms` (wall time of
  the whole snapshot), `turns` (turns the loop ran meanwhile).

`--baseline REF` also runs git REF's `logstorage.py` (loaded from `git show`, the rest of the
package from this tree), alternating which goes first each round; `--rounds` runs each (medians).
The machine's other load moves these figures: compare new and base from the same run.

Final line: `RESULT records=... gap_max_ms=... gap_p99_ms=... finish_ms=... snapshot_ms=...
[base_gap_max_ms=... base_gap_p99_ms=... base_finish_ms=... base_snapshot_ms=...
gap_max_ratio=... finish_ratio=...]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from aether.maps.records import Record  # noqa: E402
from gitsource import variants  # noqa: E402

PARTITIONS = 1024
WRITES = 3  # each record written this often: two thirds of the log are gone, so a snapshot starts
KEYS = ("gap_max_ms", "gap_p99_ms", "finish_ms", "snapshot_ms")


def _burn(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def _measure(engine: object, a: argparse.Namespace, value: bytes) -> dict[str, float]:
    snaps = engine.snapshots  # type: ignore[attr-defined]
    seq = a.records
    gaps: list[float] = []
    finish = 0.0
    engine.compact_min_bytes = 0  # type: ignore[attr-defined]  # the next commit starts one
    t_start = last = time.perf_counter()
    while engine.snapshots == snaps:  # type: ignore[attr-defined]
        for _ in range(a.per_commit):
            seq += 1
            key = f"order-{seq:09d}"
            engine.put(hash(key) % PARTITIONS, key, Record(value, 3, seq))  # type: ignore[attr-defined]
        c0 = time.perf_counter()
        engine.commit()  # type: ignore[attr-defined]
        c1 = time.perf_counter()
        if engine.snapshots != snaps:  # type: ignore[attr-defined]
            finish = c1 - c0
        _burn(a.turn_us)
        await asyncio.sleep(0)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        if now - t_start > 120:
            raise RuntimeError("the snapshot did not finish within 120 s")
    total = time.perf_counter() - t_start
    gaps.sort()
    return {
        "gap_max_ms": gaps[-1] * 1000,
        "gap_p99_ms": gaps[int(0.99 * (len(gaps) - 1))] * 1000,
        "finish_ms": finish * 1000,
        "snapshot_ms": total * 1000,
        "turns": float(len(gaps)),
    }


def run(mod: ModuleType, a: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="aether-snapshot-bench-") as d:
        engine = mod.LogStorage(Path(d) / "orders.log", compact_min_bytes=1 << 60)
        value = b"x" * a.value_size
        for rewrite in range(WRITES):
            for i in range(a.records):
                key = f"order-{i:09d}"
                p = hash(key) % PARTITIONS
                engine.put(p, key, Record(value, 3 + rewrite, i))
                if not rewrite:
                    engine.add_ops([(p, "node-1:8f2c", i, 1_700_000_000_000 + i)])
                if i % 64 == 63:
                    engine.commit()
            engine.commit()
        try:
            return uvloop.run(_measure(engine, a, value))
        finally:
            engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=60_000, help="records in the map when it snapshots")
    ap.add_argument("--value-size", type=int, default=500)
    ap.add_argument("--per-commit", type=int, default=3, help="records put per loop turn")
    ap.add_argument("--turn-us", type=float, default=300.0, help="Python work per loop turn (µs)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="REF", help="also run git REF's logstorage.py")
    a = ap.parse_args()
    for name in ("records", "value_size", "per_commit", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.turn_us < 0:
        ap.error("--turn-us must be >= 0")
    with variants("aether/maps/logstorage.py", "logstorage", a.baseline) as mods:
        figures: dict[str, list[dict[str, float]]] = {k: [] for k in mods}
        for r in range(a.rounds):
            order = list(mods) if r % 2 == 0 else list(reversed(mods))
            for name in order:
                fig = run(mods[name], a)
                figures[name].append(fig)
                shown = " ".join(f"{k}={v:.1f}" for k, v in fig.items())
                print(f"round {r + 1} {name}: {shown}", flush=True)
    out: dict[str, object] = {"records": a.records}
    for name, rows in figures.items():
        prefix = "" if name == "new" else "base_"
        for k in KEYS:
            out[f"{prefix}{k}"] = round(statistics.median(f[k] for f in rows), 2)
    if "base" in figures:
        pairs = list(zip(figures["new"], figures["base"], strict=True))
        out["gap_max_ratio"] = round(
            statistics.median(n["gap_max_ms"] / b["gap_max_ms"] for n, b in pairs), 3
        )
        out["finish_ratio"] = round(
            statistics.median(n["finish_ms"] / max(b["finish_ms"], 1e-6) for n, b in pairs), 3
        )
    print("RESULT " + " ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
