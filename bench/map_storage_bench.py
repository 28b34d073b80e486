#!/usr/bin/env python3
"""The distributed map's SQLite storage engine alone: CPU and bytes written per replicated write.

Replays what a node's map storage does for a stream of writes, with no network and no event loop:
per write the core's read of the key (`get`), the `put` of a `--value-size`-byte value and the
write's operation id (`add_ops`), and one `commit` every `--per-commit` writes (the node commits
once per event-loop turn; a busy node sees a few writes per turn). Keys: 70 % new ones, 30 % an
earlier key again, spread over 1,024 partitions. `--writes` per run, `--rounds` runs (medians).

`--baseline REF` (e.g. `main`) also runs git REF's `src/aether/maps/storage.py` (loaded from
`git show`, the rest of the package from this tree), alternating which goes first each round, and
reports the medians of the per-round ratios new/base.

Figures: `cpu_us` = process CPU (user + system) per write; `kib` = bytes the process wrote (its
`wchar`: the WAL and the checkpoints into the database file) per write, in KiB.

Final line: `RESULT writes=... per_commit=... cpu_us=... kib=... [base_cpu_us=... base_kib=...
cpu_ratio=... kib_ratio=...]`.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from aether.maps.records import Record  # noqa: E402
from gitsource import variants  # noqa: E402


def wchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def run(mod: ModuleType, writes: int, per_commit: int, value_size: int) -> tuple[float, float]:
    """(CPU µs, KiB written) per write for one fresh database."""
    with tempfile.TemporaryDirectory(prefix="aether-storage-bench-") as d:
        engine = mod.SqliteStorage(Path(d) / "m.sqlite")
        rnd = random.Random(1)
        keys = [f"order-{i:08d}" for i in range(writes)]
        value = b"x" * value_size
        w0, t0 = wchar(), time.process_time()
        for i in range(writes):
            key = keys[i] if rnd.random() < 0.7 else keys[rnd.randrange(max(1, i))]
            p = hash(key) % 1024
            engine.get(p, key)
            engine.put(p, key, Record(value, 3, i))
            engine.add_ops([(p, "node-1:8f2c", i, 1_700_000_000_000 + i)])
            if i % per_commit == per_commit - 1:
                engine.commit()
        engine.commit()
        cpu, written = time.process_time() - t0, wchar() - w0
        engine.close()
    return cpu / writes * 1e6, written / writes / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=30_000, help="writes per run")
    ap.add_argument("--per-commit", type=int, default=3, help="writes per commit (one event-loop turn)")
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="REF", help="also run git REF's storage.py")
    a = ap.parse_args()
    with variants("aether/maps/storage.py", "storage", a.baseline) as mods:
        figures: dict[str, list[tuple[float, float]]] = {k: [] for k in mods}
        for r in range(a.rounds):
            order = list(mods) if r % 2 == 0 else list(reversed(mods))
            for name in order:
                cpu, kib = run(mods[name], a.writes, a.per_commit, a.value_size)
                figures[name].append((cpu, kib))
                print(f"round {r + 1} {name}: {cpu:.1f} us CPU, {kib:.1f} KiB written per write", flush=True)
    out = {"writes": a.writes, "per_commit": a.per_commit}
    for name, rows in figures.items():
        prefix = "" if name == "new" else "base_"
        out[f"{prefix}cpu_us"] = round(statistics.median(c for c, _ in rows), 2)
        out[f"{prefix}kib"] = round(statistics.median(k for _, k in rows), 2)
    if "base" in figures:
        pairs = list(zip(figures["new"], figures["base"], strict=True))
        out["cpu_ratio"] = round(statistics.median(n[0] / b[0] for n, b in pairs), 3)
        out["kib_ratio"] = round(statistics.median(n[1] / b[1] for n, b in pairs), 3)
    print("RESULT " + " ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
