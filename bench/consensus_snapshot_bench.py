#!/usr/bin/env python3
"""What the consensus snapshot's checksum costs (`EngineSnapshot.check`, docs/consensus.md).

In one process, no network: a KV state machine is filled with `--keys` keys (``user/key-NNNNNNN``)
of `--value-size` bytes and an engine snapshots it. Each figure is the median of `--rounds` runs,
in milliseconds:

- `encode_plain_ms`: encoding the snapshot without the checksum (what the previous release did);
- `encode_sealed_ms`: `seal_snapshot` (the same encoding, its crc32 and one copy);
- `decode_ms` / `decode_check_ms`: decoding it, without and with `check_snapshot`;
- `snapshot_now_ms` / `recover_ms`: the whole `Engine.snapshot_now` (state machine included) and
  `Engine.recover` from the bytes (checked), for scale.

Final line: `RESULT keys=... size_mb=... encode_plain_ms=... encode_sealed_ms=... decode_ms=...
decode_check_ms=... snapshot_now_ms=... recover_ms=...`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from aether.consensus.engine import Engine  # noqa: E402
from aether.consensus.messages import EngineSnapshot, check_snapshot, seal_snapshot  # noqa: E402
from aether.kv.machine import KVStateMachine, Put, encode_command  # noqa: E402

MEMBERS = ["n1", "n2", "n3"]


def _median_ms(f: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    sm = KVStateMachine()
    for i in range(a.keys):
        sm.apply(encode_command(Put(f"user/key-{i:07d}", bytes([65 + i % 26]) * a.value_size)))
    engine = Engine("n1", MEMBERS, sm)
    data = engine.snapshot_now().data
    snap = msgspec.msgpack.decode(data, type=EngineSnapshot)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(EngineSnapshot)
    plain = msgspec.structs.replace(snap, check=b"")

    def recover() -> None:
        Engine("n1", MEMBERS, KVStateMachine()).recover(data, [])

    figures = {
        "encode_plain_ms": _median_ms(lambda: encoder.encode(plain), a.rounds),
        "encode_sealed_ms": _median_ms(lambda: seal_snapshot(plain), a.rounds),
        "decode_ms": _median_ms(lambda: decoder.decode(data), a.rounds),
        "decode_check_ms": _median_ms(lambda: check_snapshot(data, decoder.decode(data)), a.rounds),
        "snapshot_now_ms": _median_ms(engine.snapshot_now, a.rounds),
        "recover_ms": _median_ms(recover, a.rounds),
    }
    print(f"RESULT keys={a.keys} size_mb={len(data) / 1e6:.2f} "
          + " ".join(f"{k}={v:.1f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
