"""The audit trail of write operations on the management API, in process."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from aether.api.audit import AuditLog, target_of
from aether.api.server import ManagementServer
from test_api_roles import BOOT, KVNode, call, make_key

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def srv():
    s = ManagementServer(KVNode(), host="127.0.0.1", port=0, api_key=BOOT)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_writes_are_audited_with_who_what_and_result(
    srv: ManagementServer, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aether.audit")
    reader = await make_key(http, srv, "reader", "read")
    await call(http, srv, "GET", "/api/v1/status", reader)  # reads are not audited
    await call(http, srv, "POST", "/api/v1/deploy", reader, {"artifact": "org.x:shop:1.0.0"})
    await call(http, srv, "DELETE", "/api/v1/keys/nobody")
    await call(http, srv, "POST", "/api/v1/deploy", "reader.wrong", {"artifact": "org.x:shop:1.0.0"})
    status, entries = await call(http, srv, "GET", "/api/v1/audit")
    assert status == 200
    got = [(e["key"], e["method"], e["path"], e["target"], e["status"]) for e in entries]
    assert got == [
        ("bootstrap", "POST", "/api/v1/keys", "reader", 201),
        ("reader", "POST", "/api/v1/deploy", "org.x:shop:1.0.0", 403),
        ("bootstrap", "DELETE", "/api/v1/keys/nobody", "nobody", 404),
        (None, "POST", "/api/v1/deploy", None, 401),  # body not read for a refused key
    ]
    assert all(e["remote"] == "127.0.0.1" and e["node"] == "node-1" for e in entries)
    assert entries[0]["time"] <= entries[-1]["time"]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("aether.audit")]
    assert "audit: key=reader remote=127.0.0.1 POST /api/v1/deploy target=org.x:shop:1.0.0 -> 403" in lines
    assert len(lines) == 4
    assert reader.split(".")[1] not in caplog.text  # never the key itself


async def test_audit_needs_admin_and_limits(srv: ManagementServer, http: aiohttp.ClientSession) -> None:
    ops = await make_key(http, srv, "ops", "operate")
    assert (await call(http, srv, "GET", "/api/v1/audit", ops))[0] == 403
    for i in range(5):
        await call(http, srv, "POST", "/api/v1/maps", ops, {"name": f"m{i}"})
    status, entries = await call(http, srv, "GET", "/api/v1/audit?limit=2")
    assert status == 200 and [e["target"] for e in entries] == ["m3", "m4"]
    for bad in ("0", "1001", "x"):
        status, doc = await call(http, srv, "GET", f"/api/v1/audit?limit={bad}")
        assert status == 400 and "limit" in doc["detail"]


def test_the_window_is_bounded() -> None:
    log = AuditLog("n", capacity=3)
    for i in range(10):
        log.record(key="k", remote=None, method="POST", path=f"/p{i}", target=None, status=200)
    assert [e.path for e in log.recent(100)] == ["/p7", "/p8", "/p9"]
    assert log.recent(0) == []


def test_a_log_line_is_one_line_whatever_the_request_path(caplog: pytest.LogCaptureFixture) -> None:
    """The path and the target come from the request: a map key ending in a line break and a
    fake record (`PUT /api/v1/maps/m/entries/x%0A... audit: key=admin ...`) wrote a second, forged
    audit line into the node's text log. Control characters are escaped in the line; the entry
    keeps the path as it was."""
    caplog.set_level(logging.INFO, logger="aether.audit")
    log = AuditLog("n")
    forged = "/api/v1/maps/m/entries/x\n2026-12-07 22:11:59,613 INFO n aether.audit.n: audit: key=admin"
    log.record(key=None, remote="127.0.0.1", method="PUT", path=forged, target="x\n\x00\udc80ü", status=200)
    (line,) = [r.getMessage() for r in caplog.records if r.name.startswith("aether.audit")]
    assert "\n" not in line and "\x00" not in line and "\udc80" not in line
    assert line == (
        "audit: key=- remote=127.0.0.1 PUT /api/v1/maps/m/entries/x\\n2026-12-07 22:11:59,613 INFO n "
        "aether.audit.n: audit: key=admin target=x\\n\\x00\\udc80ü -> 200"
    )
    assert log.recent(1)[0].path == forged


def test_target_of() -> None:
    assert target_of({"id": "bp:1"}, b'{"artifact": "x"}') == "bp:1"
    assert target_of({}, b'{"artifact": "g:a:1", "instances": 2}') == "g:a:1"
    assert target_of({}, b'{"name": "orders"}') == "orders"
    assert target_of({}, b"[1]") is None and target_of({}, b"\xff") is None and target_of({}, None) is None
    assert target_of({}, b'{"name": "' + b"x" * 500 + b'"}') == "x" * 200
