"""The probes `/livez` and `/readyz`, and a public `/metrics`, on real node processes with an API
key (issue 14): no key needed for them, every other endpoint still refuses a request without one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import HOST, ProcessCluster

pytestmark = pytest.mark.timeout(120)

KEY = "bootstrap-admin-key-0123456789"


def get(port: int, path: str, *, key: str | None = None, timeout: float = 5.0) -> tuple[int, str, bytes]:
    """(status, content type, body) of `GET path` on 127.0.0.1:port."""
    import urllib.error
    import urllib.request

    headers = {"X-API-Key": key} if key is not None else {}
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def wait_for(check: Callable[[], Any], what: str, c: ProcessCluster, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c.check_alive()
        try:
            got = check()
        except OSError:
            got = None
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout}s\n{c.logs_report()}")


def test_probes_and_public_metrics_need_no_key(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path
) -> None:
    import json

    key_file = tmp_path / "api.key"
    key_file.write_text(KEY + "\n")
    c = make_process_cluster(3, start=False, extra_args=["--api-key-file", str(key_file), "--metrics-public"])
    c.start(0)  # alone: alive, not ready (no quorum)
    port = c.management_ports[0]
    wait_for(lambda: get(port, "/livez")[0] == 200, "/livez 200", c)
    status, ctype, body = get(port, "/livez")
    doc = json.loads(body)
    assert doc["live"] is True and doc["node_id"] == "node-1"
    status, ctype, body = get(port, "/readyz")
    assert status == 503 and ctype.startswith("application/problem+json")
    doc = json.loads(body)
    assert doc["ready"] is False and "no quorum: 1 of 3 members up" in doc["reason"]
    assert doc["detail"] == doc["reason"]
    # everything else still needs the key
    assert get(port, "/api/v1/health")[0] == 401
    assert get(port, "/api/v1/status")[0] == 401
    assert get(port, "/api/v1/metrics")[0] == 401

    c.start(1)
    c.start(2)
    wait_for(lambda: get(port, "/readyz")[0] == 200, "/readyz 200", c)
    doc = json.loads(get(port, "/readyz")[2])
    assert doc["ready"] is True and doc["quorum"] is True
    # --metrics-public: the Prometheus exposition without a key, and a wrong key is not even looked at
    status, ctype, body = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain") and b"aether_" in body
    assert get(port, "/metrics", key="wrong")[0] == 200
    assert get(port, "/readyz", key="wrong")[0] == 200
    assert get(port, "/api/v1/status", key="wrong")[0] == 401
    assert get(port, "/api/v1/status", key=KEY)[0] == 200
    # the OpenAPI document lists the probes as needing no key
    doc = json.loads(get(port, "/api/v1/openapi.json", key=KEY)[2])
    assert doc["paths"]["/livez"]["get"]["security"] == []
    assert doc["paths"]["/readyz"]["get"]["security"] == []
    assert doc["paths"]["/metrics"]["get"]["security"] == []


def test_metrics_keep_the_key_by_default(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path
) -> None:
    key_file = tmp_path / "api.key"
    key_file.write_text(KEY + "\n")
    c = make_process_cluster(1, start=False, extra_args=["--api-key-file", str(key_file)])
    c.start(0)
    port = c.management_ports[0]
    wait_for(lambda: get(port, "/readyz")[0] == 200, "/readyz 200 (one member is a quorum)", c)
    assert get(port, "/metrics")[0] == 401
    assert get(port, "/metrics", key=KEY)[0] == 200
    assert get(port, "/livez")[0] == 200
