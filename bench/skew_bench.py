#!/usr/bin/env python3
"""Clock skew: commit latency of writes through a node whose clock runs ahead, against the others.

Starts 3 nodes in this process (real transport on 127.0.0.1, free ports, durable default fsync,
data in a fresh temp dir), sets the last node's wall clock `--skew` seconds ahead (the engine's
clock offset, which is what orders batches), and runs `--writers` concurrent writers per node,
each doing one KV put after another for `--seconds`. Every put's latency is recorded per node.
The same run first measures with no skew, as the baseline.

    .venv/bin/python bench/skew_bench.py --skew 3 --seconds 5

Last line: RESULT skew_s=3 base_p50_ms=... skewed_node_p50_ms=... other_nodes_p50_ms=...
skewed_over_others=... timeouts_base=... timeouts_skewed=... (medians; the ratio is what to
compare across machines; a put that times out after 1.5 s counts with its full latency).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from aether.core.config import NodeConfig
from aether.core.errors import CommitTimeout
from aether.core.types import Address, PeerSpec
from aether.node.node import Node

Latencies = dict[str, list[float]]


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


async def run(skew: float, seconds: float, writers: int, work: Path) -> tuple[Latencies, int]:
    ports = free_ports(3)
    peers = [PeerSpec(f"node-{i + 1}", Address("127.0.0.1", p)) for i, p in enumerate(ports)]
    nodes = [
        Node(NodeConfig(node_id=f"node-{i + 1}", peers=peers, cluster_port=ports[i], management_port=0,
                        http_port=0, data_dir=str(work / f"n{i}")))
        for i in range(3)
    ]
    nodes[2].runner.engine.clock_offset += skew
    for n in nodes:
        await n.start(management=False)
    try:
        deadline = time.monotonic() + 20
        while not all(n.transport.has_quorum() for n in nodes):
            if time.monotonic() > deadline:
                raise SystemExit("no quorum in 20 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        lat: dict[str, list[float]] = {n.node_id: [] for n in nodes}
        failed = {n.node_id: 0 for n in nodes}
        end = time.monotonic() + seconds

        async def writer(n: Node, w: int) -> None:
            i = 0
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    await n.kv.put(f"user/{n.node_id}-{w}-{i % 50}", b"x" * 64)
                except CommitTimeout:
                    failed[n.node_id] += 1  # starved: counted, and its latency is at least the timeout
                lat[n.node_id].append(time.perf_counter() - t0)
                i += 1

        await asyncio.gather(*(writer(n, w) for n in nodes for w in range(writers)))
        return lat, sum(failed.values())
    finally:
        for n in nodes:
            await n.stop()


def p50_ms(xs: list[float]) -> float:
    return round(1e3 * statistics.median(xs), 2) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skew", type=float, default=3.0, help="seconds node-3's clock runs ahead")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--writers", type=int, default=4, help="concurrent writers per node")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="aether-skew-bench-"))
    try:
        base, base_timeouts = asyncio.run(run(0.0, a.seconds, a.writers, work / "base"))
        skewed, skewed_timeouts = asyncio.run(run(a.skew, a.seconds, a.writers, work / "skew"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for label, lat in (("no skew", base), (f"node-3 +{a.skew:g} s", skewed)):
        print(f"{label:>14}: " + "  ".join(f"{k} p50 {p50_ms(v)} ms ({len(v)} puts)" for k, v in lat.items()))
    others = skewed["node-1"] + skewed["node-2"]
    base_all = [x for v in base.values() for x in v]
    ratio = statistics.median(skewed["node-3"]) / statistics.median(others)
    print(
        f"RESULT skew_s={a.skew:g} base_p50_ms={p50_ms(base_all)} "
        f"skewed_node_p50_ms={p50_ms(skewed['node-3'])} other_nodes_p50_ms={p50_ms(others)} "
        f"skewed_over_others={ratio:.2f} timeouts_base={base_timeouts} timeouts_skewed={skewed_timeouts}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
