"""Worker processes end to end on 3 in-process nodes (issue 17): a blueprint's `isolation = "process"`
runs the greeter in a worker on the node that hosts it; its HTTP route, reached through another
node, calls hello through the node's invoker; a `NotFound` raised in a worker answers 404."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from aether.core.artifact import Artifact
from conftest import running_cluster

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

GREETER = Artifact.parse("org.example:greeter:0.1.0")
PICKY = "org.example:picky:1.0.0"
PICKY_SRC = """
import os
from aether.slices import Slice, route, NotFound

class Picky(Slice):
    @route("GET", "/picky/{name}")
    async def pick(self, name: str) -> int:
        if name != "ok":
            raise NotFound(f"no {name} here")
        return os.getpid()
"""
BLUEPRINT = f"""
id = "isolated:1"
[slices.greeter]
artifact = "{GREETER}"
isolation = "process"

[slices.picky]
artifact = "{PICKY}"
isolation = "process"
"""


async def test_isolation_process_from_a_blueprint_serves_http_and_calls(tmp_path: Path) -> None:
    async with running_cluster(tmp_path, extra={PICKY: (PICKY_SRC, "Picky")}) as nodes:
        n1 = nodes[0]
        await n1.deployments.apply_blueprint(BLUEPRINT, "isolated.toml")
        await n1.deployments.wait_converged("isolated:1", timeout=60)
        host = next(n for n in nodes if n.slice_runtime.local_instances(str(GREETER)))
        assert host.slice_runtime.isolation(GREETER) == "process"
        pid = host.slice_runtime.worker_pid(GREETER)
        assert pid is not None and pid != os.getpid()
        picky_host = next(n for n in nodes if n.slice_runtime.local_instances(PICKY))
        picky_pid = picky_host.slice_runtime.worker_pid(Artifact.parse(PICKY))
        hello = Artifact.parse("org.example:hello:0.1.0")
        assert all(n.slice_runtime.isolation(hello) in (None, "thread") for n in nodes)
        caller = next(n for n in nodes if n is not host)
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{caller.http.port}"
            async with http.post(f"{base}/greeter/welcome", json={"names": ["ann", "bob"]}) as r:
                body = await r.json()
                assert r.status == 200, body
            assert ["ann" in body[0]["text"], "bob" in body[1]["text"]] == [True, True], body
            async with http.get(f"{base}/picky/ok") as r:
                assert r.status == 200 and int(await r.text()) == picky_pid
            async with http.get(f"{base}/picky/nope") as r:
                assert r.status == 404
                assert (await r.json())["detail"] == "no nope here"
    assert picky_pid is not None
    for p in (pid, picky_pid):  # the nodes stopped: so did their workers
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)
