"""Management API hardening, in process: malformed credentials, slow clients, idle connections."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from aether.api.server import ManagementServer
from aether.core.errors import ConfigError
from test_api import FakeNode

pytestmark = pytest.mark.timeout(30)

KEY = "s3cret-key"


async def raw_request(port: int, data: bytes, *, read_timeout: float = 5.0) -> tuple[int, dict]:
    """Send raw bytes to 127.0.0.1:port, return (status, JSON body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}


@pytest.fixture
async def keyed(request: pytest.FixtureRequest):
    kw = getattr(request, "param", {})
    srv = ManagementServer(FakeNode(), host="127.0.0.1", port=0, api_key=KEY, **kw)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    "header",
    [
        b"X-API-Key: \xff\xfe\xfd",
        b"X-API-Key: s3cret-key\xc3",
        b"X-API-Key: \xc3\xa9t\xc3\xa9",  # valid UTF-8, not ASCII
        b"Authorization: Bearer \xff\xff",
    ],
)
async def test_non_ascii_key_bytes_are_401_not_500_and_log_no_traceback(
    keyed: ManagementServer, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    req = b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n"
    status, body = await raw_request(keyed.port, req)
    assert status == 401, body
    assert body["status"] == 401 and "API key" in body["detail"]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize("header", [b"X-API-Key: a\x7fb", b"X-API-Key: a\x00b", b"X-\xff: 1"])
async def test_bytes_the_parser_refuses_are_400_logged_in_one_line(
    keyed: ManagementServer, header: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", keyed.port)
    writer.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    assert raw.split(b"\r\n", 1)[0].split(b" ")[1] == b"400", raw[:200]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert any("malformed HTTP request refused (400" in r.getMessage() for r in caplog.records)


async def test_malformed_authorization_scheme_is_401_naming_the_form(keyed: ManagementServer) -> None:
    req = b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Token abc\r\nConnection: close\r\n\r\n"
    status, body = await raw_request(keyed.port, req)
    assert status == 401
    assert "Bearer KEY" in body["detail"]


@pytest.mark.parametrize("keyed", [{"idle_timeout": 0.5}], indirect=True)
async def test_half_sent_request_heads_are_closed_after_the_idle_timeout(keyed: ManagementServer) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", keyed.port) for _ in range(5)]
    t0 = time.monotonic()
    for _, w in conns:
        w.write(b"GET /api/v1/status HTTP/1.1\r\nHost: x\r\n")  # never finished
    # keep trickling header bytes: the timeout counts from the connection, not the last byte
    async def trickle(w: asyncio.StreamWriter) -> None:
        try:
            for i in range(20):
                await asyncio.sleep(0.1)
                w.write(f"X-{i}: y\r\n".encode())
        except (ConnectionError, RuntimeError):
            pass

    tasks = [asyncio.create_task(trickle(w)) for _, w in conns]
    closed_at = []
    for r, _ in conns:
        assert await asyncio.wait_for(r.read(), 5.0) == b""  # EOF, no answer
        closed_at.append(time.monotonic() - t0)
    for t in tasks:
        t.cancel()
    for _, w in conns:
        w.close()
    assert max(closed_at) < 1.8, closed_at
    assert min(closed_at) >= 0.4, closed_at


@pytest.mark.parametrize("keyed", [{"body_timeout": 0.5}], indirect=True)
async def test_a_trickled_body_is_408(keyed: ManagementServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", keyed.port)
    writer.write(
        b"POST /api/v1/status HTTP/1.1\r\nHost: x\r\nX-API-Key: s3cret-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    t0 = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"Connection: close" in head
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = json.loads(await reader.readexactly(length))
    assert body["status"] == 408 and "not received within 0.5 s" in body["detail"]
    # the connection goes too, after aiohttp's short lingering time for the unread rest
    assert await asyncio.wait_for(reader.read(), 5.0) == b""
    assert time.monotonic() - t0 < 4.0
    writer.close()


async def test_timeouts_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        ManagementServer(FakeNode(), host="127.0.0.1", port=0, idle_timeout=0)
