#!/usr/bin/env python3
"""Artifact repository benchmark (docs/repository.md): uploading a wheel into the cluster, and the
cold start of a slice on nodes that have never seen it, each against a baseline of the same run.

Starts `--nodes` real `aether node` processes on loopback (default 3), each with its own empty
repository directory. Builds slice wheels of `--mb` MiB (random, incompressible payload), then:

- **upload**: `--rounds` times, `PUT /api/v1/repository/files/{wheel}?sha256=` of a new version
  through node-1 (stream, hash, inspect, chunks to the map's replicas, manifest through consensus);
  baselines: a plain HTTP PUT of the same bytes to an aiohttp handler that writes them to a file
  (`put_baseline_s`), and a local file copy with fsync (`copy_baseline_s`);
- **cold start**: deploy one uploaded version with one instance per node after removing node-1's
  cached copy, so every node resolves, fetches from the cluster, installs and activates it; until
  all are ACTIVE (`cold_start_s`). Baseline: the same-sized slice placed in every node's directory
  beforehand (no fetch: `local_start_s`).

Final line: `RESULT nodes=3 wheel_mb=5.0 upload_s=... put_baseline_s=... upload_ratio=...
copy_baseline_s=... cold_start_s=... local_start_s=... cold_ratio=...` (upload figures are
medians; ratios are upload/plain PUT and cold/local start).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from deploy_bench import http  # noqa: E402
from kv_bench import HOST, Cluster, log, result_line  # noqa: E402

SOURCE = """
from aether.slices import Slice, entry

class Big(Slice):
    @entry
    async def ping(self, text: str) -> str:
        return text
"""


class OwnDirectories(Cluster):
    """Nodes with separate repository directories (nothing shared but the network)."""

    def repo(self, i: int) -> Path:
        return Path(self.workdir) / f"{self.ids[i]}-repository"

    def start_node(self, i: int) -> None:
        self.extra = ["--repository", str(self.repo(i))]
        super().start_node(i)


def build(out: Path, coords: str, mb: float) -> Path:
    from aether.slices.testing import build_slice_wheel

    artifact = coords.split(":")[1]
    payload = os.urandom(int(mb * 1024 * 1024))
    return build_slice_wheel(
        out / coords.replace(":", "-"),
        coords,
        SOURCE,
        "Big",
        module=f"{artifact}_slice",
        extra_files={f"{artifact}_slice/payload.bin": payload},
    )


def put(url: str, data: bytes, timeout: float = 120.0) -> float:
    req = urllib.request.Request(
        url, data=data, method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
        assert r.status in (200, 201), r.status
    return time.perf_counter() - t0


class PlainPutServer:
    """The baseline: an aiohttp handler that streams a PUT body into a file (fsync), in a thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            with open(self.directory / "upload.bin", "wb") as f:
                async for data in request.content.iter_chunked(256 * 1024):
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return web.Response(status=201)

        async def main() -> None:
            app = web.Application()
            app.router.add_put("/{name}", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, HOST, 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self._loop = asyncio.get_running_loop()
            stop = self._stop = asyncio.Event()
            self._ready.set()
            await stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)


def deploy_until_active(port: int, artifact: str, n: int, timeout: float) -> float:
    t0 = time.perf_counter()
    http(port, "POST", "/api/v1/deploy", {"artifact": artifact, "instances": n}, timeout=timeout)
    while True:
        st: Any = http(port, "GET", "/api/v1/slices")
        s = next((x for x in st if x["artifact"] == artifact), None)
        if s is not None:
            failed = [i for i in s["instances"] if i["state"] == "FAILED"]
            if failed:
                raise RuntimeError(f"{artifact} FAILED: {failed[0]}")
            if s["active"] == n:
                return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"{artifact}: not ACTIVE within {timeout}s: {s}")
        time.sleep(0.005)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--mb", type=float, default=5.0, help="wheel size (MiB)")
    ap.add_argument("--rounds", type=int, default=3, help="uploads (each a new version)")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aether-repository-bench-"))
    os.environ.pop("AETHER_REPOSITORY", None)
    log(f"building {a.rounds + 1} wheels of {a.mb:g} MiB")
    wheels = [build(work / "wheels", f"org.bench:big:1.{r}.0", a.mb) for r in range(a.rounds)]
    # the baseline slice, placed in every node's directory (another artifact: two versions of one
    # slice's code cannot share a node's process)
    local = build(work / "wheels", "org.bench:local:1.0.0", a.mb)
    cluster = OwnDirectories(a.nodes, str(work), no_uvloop=False, fsync=None, extra=[])
    sink = PlainPutServer(work)
    res: dict[str, object] = {"nodes": a.nodes, "wheel_mb": round(wheels[0].stat().st_size / 2**20, 2)}
    rc = 0
    try:
        cluster.start()
        sink.start()
        port = cluster.mgmt_ports[0]
        ups, puts, copies = [], [], []
        for w in wheels:
            data = w.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            url = f"http://{HOST}:{port}/api/v1/repository/files/{w.name}?sha256={sha}"
            ups.append(put(url, data, a.timeout))
            puts.append(put(f"http://{HOST}:{sink.port}/{w.name}", data, a.timeout))
            t0 = time.perf_counter()
            dest = work / "copy.whl"
            shutil.copyfile(w, dest)
            with open(dest, "rb+") as f:
                os.fsync(f.fileno())
            copies.append(time.perf_counter() - t0)
            log(f"upload {w.name}: {ups[-1]:.3f} s (plain PUT {puts[-1]:.3f} s, copy {copies[-1]:.3f} s)")
        res["upload_s"] = statistics.median(ups)
        res["put_baseline_s"] = statistics.median(puts)
        res["upload_ratio"] = statistics.median(ups) / statistics.median(puts)
        res["copy_baseline_s"] = statistics.median(copies)

        # cold start: nobody has the wheel locally (node-1's copy from the upload removed)
        for i in range(a.nodes):
            shutil.rmtree(cluster.repo(i) / "org" / "bench", ignore_errors=True)
        cold_art = "org.bench:big:1.0.0"
        res["cold_start_s"] = deploy_until_active(port, cold_art, a.nodes, a.timeout)
        fetched = sum(
            (cluster.repo(i) / "org" / "bench" / "big" / "1.0.0" / wheels[0].name).is_file()
            for i in range(a.nodes)
        )
        cold = res["cold_start_s"]
        log(f"cold start of {cold_art} on {a.nodes} nodes: {cold:.3f} s ({fetched} nodes fetched it)")
        # baseline: the same-sized slice already in every node's directory (resolved there, no fetch)
        from aether.slices.repository import Repository

        for i in range(a.nodes):
            Repository(cluster.repo(i)).deploy(local)
        local_art = "org.bench:local:1.0.0"
        res["local_start_s"] = deploy_until_active(port, local_art, a.nodes, a.timeout)
        log(f"start of {local_art} from the local directories: {res['local_start_s']:.3f} s")
        res["cold_ratio"] = float(res["cold_start_s"]) / float(res["local_start_s"])  # type: ignore[arg-type]
    except Exception as e:
        log(f"ERROR: {type(e).__name__}: {e}")
        cluster.log_tails()
        res["error"] = type(e).__name__
        rc = 1
    finally:
        sink.stop()
        cluster.stop_all()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work dir kept: {work}")
    print(result_line(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
