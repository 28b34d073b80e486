"""Tests of aether.http.wire.WireServer (the router's HTTP/1.1 protocol) over real loopback sockets:
raw bytes in, raw bytes out, so framing, keep-alive, pipelining and limits are checked exactly."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from aether.http.wire import WireReply, WireRequest, WireServer

pytestmark = pytest.mark.timeout(60)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[WireRequest] = []
        self.gate: asyncio.Event | None = None  # when set, requests wait for it

    async def __call__(self, req: WireRequest) -> WireReply:
        self.seen.append(req)
        if self.gate is not None:
            await self.gate.wait()
        if req.path == "/boom":
            raise RuntimeError("handler bug")
        body = f"{req.method} {req.path} ?{req.query} {len(req.body)}".encode()
        return WireReply(200, body, "text/plain", [("X-N", str(len(self.seen)))])


@pytest.fixture
async def served() -> AsyncIterator[tuple[WireServer, Recorder]]:
    rec = Recorder()
    server = WireServer(
        rec,
        name="test",
        max_body=1000,
        idle_timeout=1.0,
        body_timeout=0.6,
        on_body_timeout=lambda: WireReply(408, b"late", "text/plain"),
        logger=logging.getLogger("test.wire"),
        max_line=200,
        max_head=1000,
        max_headers=10,
    )
    await server.start("127.0.0.1", 0, None)
    try:
        yield server, rec
    finally:
        await server.stop()


async def talk(server: WireServer, data: bytes, *, until_close: bool = True, n: int = 1) -> bytes:
    """Send `data`; read until the server closes (or `n` answers with bodies have come)."""
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        if until_close:
            return await asyncio.wait_for(reader.read(), 10)
        out = b""
        while out.count(b"HTTP/1.1 ") < n or not _complete(out, n):
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, out
            out += chunk
        return out
    finally:
        writer.close()


def _complete(out: bytes, n: int) -> bool:
    answers = split_answers(out)
    return len(answers) >= n


def split_answers(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse consecutive HTTP/1.1 answers with Content-Length bodies."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        out.append((status, headers, rest[:length]))
        raw = rest[length:]
    return out


async def test_keep_alive_and_pipelining_answer_in_order(served: tuple[WireServer, Recorder]) -> None:
    server, _ = served
    reqs = b"".join(f"GET /p{i}?q={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for i in range(5))
    raw = await talk(server, reqs, until_close=False, n=5)
    answers = split_answers(raw)
    assert [a[2] for a in answers] == [f"GET /p{i} ?q={i} 0".encode() for i in range(5)]
    assert all(
        a[0] == 200 and "connection" not in a[1] and a[1]["content-type"] == "text/plain" for a in answers
    )
    assert [a[1]["x-n"] for a in answers] == ["1", "2", "3", "4", "5"]
    assert all("date" in a[1] for a in answers)


async def test_pipelined_requests_wait_for_the_one_being_served(served: tuple[WireServer, Recorder]) -> None:
    server, rec = served
    rec.gate = asyncio.Event()
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.2)
    assert [r.path for r in rec.seen] == ["/a"]  # one at a time per connection
    rec.gate.set()
    out = b""
    while len(split_answers(out)) < 2:
        out += await asyncio.wait_for(reader.read(65536), 5)
    assert [a[2] for a in split_answers(out)] == [b"GET /a ? 0", b"GET /b ? 0"]
    writer.close()


async def test_connection_close_and_http10(served: tuple[WireServer, Recorder]) -> None:
    server, _ = served
    raw = await talk(server, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    [(status, headers, body)] = split_answers(raw)
    assert (status, headers["connection"], body) == (200, "close", b"GET /x ? 0")
    raw = await talk(server, b"GET /y HTTP/1.0\r\n\r\n")  # HTTP/1.0 closes unless told
    assert split_answers(raw)[0][1]["connection"] == "close"
    raw = await talk(server, b"GET /z HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", until_close=False)
    assert split_answers(raw)[0][1]["connection"] == "keep-alive"


async def test_bodies_content_length_chunked_and_expect_continue(served: tuple[WireServer, Recorder]) -> None:
    server, rec = served
    raw = await talk(
        server, b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", until_close=False
    )
    assert split_answers(raw)[0][2] == b"POST /b ? 5"
    chunked = (
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    raw = await talk(server, chunked, until_close=False)
    assert split_answers(raw)[0][2] == b"POST /c ? 7" and rec.seen[-1].body == b"abcdefg"
    # Expect: 100-continue gets its interim answer before the body is sent
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"abc")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK") and rec.seen[-1].body == b"abc"
    writer.close()


async def test_head_has_no_body_but_its_length(served: tuple[WireServer, Recorder]) -> None:
    server, _ = served
    raw = await talk(server, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert rest == b"" and b"Content-Length: 11\r\n" in head  # len(b"HEAD /h ? 0")


async def test_too_large_bodies_are_dispatched_once_marked_and_close(
    served: tuple[WireServer, Recorder],
) -> None:
    server, rec = served
    raw = await talk(server, b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
    assert split_answers(raw)[0][1]["connection"] == "close"
    assert rec.seen[-1].too_large == 5000 and rec.seen[-1].body == b""
    chunks = b"".join(b"64\r\n" + b"y" * 100 + b"\r\n" for _ in range(12)) + b"0\r\n\r\n"
    raw = await talk(server, b"POST /bigc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert len(split_answers(raw)) == 1
    assert (
        rec.seen[-1].path == "/bigc" and rec.seen[-1].too_large is not None and rec.seen[-1].too_large > 1000
    )
    # a request pipelined behind the too-large one is not served
    assert [r.path for r in rec.seen] == ["/big", "/bigc"]


@pytest.mark.parametrize(
    ("data", "status", "text"),
    [
        (b"\x00\xffNOT HTTP\r\n\r\n", 400, b"Bad Request"),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, b"200 bytes"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(11)) + b"\r\n",
            431,
            b"10 fields",
        ),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 1200 + b"\r\n\r\n", 431, b"1000 bytes"),
        (b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab", 400, b"Bad Request"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, b"Bad"),
    ],
)
async def test_bad_requests_get_a_plain_answer_and_a_close(
    served: tuple[WireServer, Recorder], data: bytes, status: int, text: bytes
) -> None:
    server, rec = served
    raw = await talk(server, data)
    [(got, headers, body)] = split_answers(raw)
    assert (got, headers["connection"]) == (status, "close") and text in body, raw
    assert rec.seen == []
    # the server goes on
    assert split_answers(await talk(server, b"GET /ok HTTP/1.1\r\nConnection: close\r\n\r\n"))[0][0] == 200


async def test_upgrade_and_connect_requests_are_served_then_closed(
    served: tuple[WireServer, Recorder],
) -> None:
    """No protocol upgrades: the request is answered like any other, then the connection closes
    (the bytes after it belong to another protocol and are not read)."""
    server, rec = served
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    [(status, headers, body)] = split_answers(await talk(server, upgrade))
    assert (status, headers["connection"], body) == (200, "close", b"GET /ws ? 0")
    raw = await talk(server, b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01")
    [(status, headers, _)] = split_answers(raw)
    assert (status, headers["connection"]) == (200, "close")
    assert [r.method for r in rec.seen] == ["GET", "CONNECT"]


async def test_handler_exception_is_500_and_the_connection_goes_on(
    served: tuple[WireServer, Recorder],
) -> None:
    server, _ = served
    raw = await talk(server, b"GET /boom HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n", until_close=False, n=2)
    [(s1, _, _), (s2, _, b2)] = split_answers(raw)
    assert (s1, s2, b2) == (500, 200, b"GET /after ? 0")


async def test_slow_head_is_closed_without_answer_and_slow_body_gets_the_timeout_answer(
    served: tuple[WireServer, Recorder],
) -> None:
    server, rec = served
    assert server.port is not None
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\nX-Slow: ")  # never finishes its head (idle_timeout 1 s)
    for _ in range(4):  # trickling does not extend the deadline
        await asyncio.sleep(0.2)
        writer.write(b"a")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.9 < time.monotonic() - t0 < 2.5
    writer.close()
    t0 = time.monotonic()
    raw = await talk(server, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")  # body_timeout 0.6 s
    assert split_answers(raw)[0][0] == 408 and 0.5 < time.monotonic() - t0 < 2.5
    assert rec.seen == []


async def test_idle_keep_alive_connection_closes_after_idle_timeout(
    served: tuple[WireServer, Recorder],
) -> None:
    server, _ = served
    assert server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    t0 = time.monotonic()
    raw = await asyncio.wait_for(reader.read(), 5)  # the answer, then the close after 1 s idle
    assert split_answers(raw)[0][0] == 200 and 0.9 < time.monotonic() - t0 < 2.5
    writer.close()


async def test_stop_lets_a_busy_request_finish_within_the_shutdown_timeout(
    served: tuple[WireServer, Recorder],
) -> None:
    server, rec = served
    rec.gate = asyncio.Event()
    port = server.port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    asyncio.get_running_loop().call_later(0.2, rec.gate.set)
    await server.stop()
    raw = await asyncio.wait_for(reader.read(), 5)
    [(status, headers, _)] = split_answers(raw)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(idle_r.read(), 5) == b""  # the idle one was closed at once
    writer.close()
    idle_w.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer listening


# --- the protocol fed directly: any split of the bytes gives the same answers ---------------------


class FakeTransport:
    """Collects what the protocol writes; `pause_reading` etc. are recorded, not acted on."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _request(i: int, kind: int, body_len: int) -> bytes:
    body = bytes([97 + (i + j) % 26 for j in range(body_len)])
    if kind == 0:
        return f"GET /g{i}?n={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    if kind == 1:
        return f"POST /p{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {body_len}\r\n\r\n".encode() + body
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[k : k + 7]), body[k : k + 7]) for k in range(0, body_len, 7)
    )
    return (
        f"POST /c{i} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + chunks
        + b"0\r\n\r\n"
    )


def _expected(i: int, kind: int, body_len: int) -> bytes:
    if kind == 0:
        return f"GET /g{i} ?n={i} 0".encode()
    return f"POST /{'p' if kind == 1 else 'c'}{i} ? {body_len}".encode()


async def _feed(chunks: list[bytes]) -> tuple[FakeTransport, Recorder]:
    from aether.http.wire import _Conn

    rec = Recorder()
    server = WireServer(
        rec, name="fed", max_body=1000, idle_timeout=30, body_timeout=30,
        on_body_timeout=lambda: WireReply(408, b"late", "text/plain"), logger=logging.getLogger("test.wire"),
    )  # fmt: skip
    conn = _Conn(server)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        conn.data_received(chunk)
        await asyncio.sleep(0)  # let the serving task run between chunks now and then
    for _ in range(50):
        await asyncio.sleep(0)
    return transport, rec


@pytest.mark.timeout(120)
def test_any_split_of_pipelined_requests_gives_the_same_answers() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    requests = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), min_size=1, max_size=5)

    @settings(max_examples=150, deadline=None)
    @given(requests, st.lists(st.integers(1, 60), min_size=1, max_size=40))
    def check(reqs: list[tuple[int, int]], cuts: list[int]) -> None:
        data = b"".join(_request(i, kind, n) for i, (kind, n) in enumerate(reqs))
        chunks, pos = [], 0
        for c in cuts:
            if pos >= len(data):
                break
            chunks.append(data[pos : pos + c])
            pos += c
        if pos < len(data):
            chunks.append(data[pos:])
        transport, rec = asyncio.run(_feed(chunks))
        answers = split_answers(bytes(transport.out))
        assert [a[2] for a in answers] == [_expected(i, k, n) for i, (k, n) in enumerate(reqs)]
        assert all(a[0] == 200 for a in answers) and not transport.closed
        assert [r.body for r in rec.seen] == [
            bytes([97 + (i + j) % 26 for j in range(n)]) if k else b"" for i, (k, n) in enumerate(reqs)
        ]

    check()
