#!/usr/bin/env python3
"""Deployment benchmark: seconds from `blueprint apply` to every instance ACTIVE.

Starts `--nodes` real `aether node` processes on loopback (default 5) with a temporary slice
repository holding the hello example's two slices (wheels built from `examples/hello` sources),
then `--rounds` times: POST the blueprint (hello x `--hello` + greeter x `--greeter`, 11 instances
by default) to node-1's management API, poll `/api/v1/slices` every 5 ms until every instance is
ACTIVE, then delete the blueprint and wait until nothing is left. The first round also installs
the wheels on each node; later rounds reuse the node-local library/code store.

Final line: `RESULT nodes=5 instances=11 first_s=... median_s=... max_s=...`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kv_bench import HOST, Cluster, log, result_line  # noqa: E402

EXAMPLES = HERE.parent / "examples" / "hello"


def http(port: int, method: str, path: str, body: object | None = None, timeout: float = 10.0) -> Any:
    """`method` `path` on the management API at `port` with the JSON `body`; the decoded JSON answer
    (None when empty). Raises urllib's HTTPError for an error answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://{HOST}:{port}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip() else None


def build_repository(root: Path, wheels: Path) -> None:
    from aether.slices.repository import Repository
    from aether.slices.testing import build_slice_wheel

    repo = Repository(root)
    hello = (EXAMPLES / "hello-slice" / "hello_slice" / "__init__.py").read_text()
    greeter = (EXAMPLES / "greeter-service" / "greeter_slice" / "__init__.py").read_text()
    repo.deploy(build_slice_wheel(wheels, "org.example:hello:0.1.0", hello, "Hello", module="hello_slice"))
    repo.deploy(
        build_slice_wheel(
            wheels,
            "org.example:greeter:0.1.0",
            greeter,
            "Greeter",
            module="greeter_slice",
            dependencies={"org.example:hello": "^0.1.0"},
        )
    )


def converged(statuses: list[dict], want: dict[str, int]) -> bool:
    by = {s["artifact"]: s for s in statuses}
    for art, n in want.items():
        s = by.get(art)
        if s is None or s["active"] != n or any(i["state"] != "ACTIVE" for i in s["instances"]):
            return False
        if sum(len(i["instance_ids"]) for i in s["instances"]) != n:
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--hello", type=int, default=8, help="instances of org.example:hello")
    ap.add_argument("--greeter", type=int, default=3, help="instances of org.example:greeter")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="aether-deploy-bench-")
    os.environ["AETHER_REPOSITORY"] = os.path.join(work, "repo")
    build_repository(Path(work) / "repo", Path(work) / "wheels")
    cluster = Cluster(a.nodes, work, no_uvloop=False, fsync=None, extra=[])
    res: dict[str, object] = {"nodes": a.nodes, "instances": a.hello + a.greeter}
    rc = 0
    try:
        t0 = time.perf_counter()
        cluster.start()
        log(f"{a.nodes} nodes up with quorum in {time.perf_counter() - t0:.2f} s")
        port = cluster.mgmt_ports[0]
        want = {"org.example:hello:0.1.0": a.hello, "org.example:greeter:0.1.0": a.greeter}
        toml = (
            'id = "bench:0.1.0"\n\n[slices.hello]\nartifact = "org.example:hello:0.1.0"\n'
            f'instances = {a.hello}\n\n[slices.greeter]\nartifact = "org.example:greeter:0.1.0"\n'
            f"instances = {a.greeter}\n"
        )
        times: list[float] = []
        for r in range(a.rounds):
            t_apply = time.perf_counter()
            http(port, "POST", "/api/v1/blueprints", {"toml": toml, "filename": "bench.blueprint"})
            while True:
                st = http(port, "GET", "/api/v1/slices")
                if converged(st, want):  # type: ignore[arg-type]
                    break
                failed = [(s["artifact"], i) for s in st for i in s["instances"] if i["state"] == "FAILED"]  # type: ignore[union-attr]
                if failed:
                    raise RuntimeError(f"instance FAILED: {failed[0]}")
                if time.perf_counter() - t_apply > a.timeout:
                    raise RuntimeError(f"not converged within {a.timeout}s: {st}")
                time.sleep(0.005)
            dt = time.perf_counter() - t_apply
            times.append(dt)
            nodes = sorted({i["node"] for s in st for i in s["instances"]})  # type: ignore[union-attr]
            log(f"round {r + 1}: {a.hello + a.greeter} instances ACTIVE on {len(nodes)} nodes in {dt:.3f} s")
            http(port, "DELETE", "/api/v1/blueprints/bench:0.1.0")
            t_del = time.perf_counter()
            while http(port, "GET", "/api/v1/slices"):
                if time.perf_counter() - t_del > a.timeout:
                    raise RuntimeError("blueprint deletion did not converge")
                time.sleep(0.01)
            log(f"round {r + 1}: undeployed in {time.perf_counter() - t_del:.3f} s")
        res["first_s"] = times[0]
        later = times[1:] or times
        res["median_s"] = statistics.median(later)
        res["max_s"] = max(later)
    except Exception as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        cluster.log_tails()
        res["error"] = type(e).__name__
        rc = 1
    finally:
        cluster.stop_all()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work dir kept: {work}")
    print(result_line(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
