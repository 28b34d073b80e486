"""`WireServer`: the HTTP/1.1 server under the router, an `asyncio.Protocol` over httptools.

The router's per-request work is small (match a route, bind the arguments, call the invoker), so
the HTTP machinery around it dominated its profile: aiohttp's server costs about 40 µs of CPU per
request on the benchmark machine, while llhttp through httptools and one `transport.write` per
answer cost under 10 µs (bench/README.md, *Limits*). This module does only what the router needs:

- parses requests with httptools (llhttp, the parser of Node.js and of aiohttp's C extension),
  keep-alive and pipelining (answers in request order, one request served at a time per
  connection), ``Expect: 100-continue``, chunked bodies, ``HEAD`` (the head without the body);
- bounds what it buffers before anything is served: a request line of at most `max_line` bytes
  (414), a head of at most `max_head` bytes and `max_headers` fields (431), a body of at most
  `max_body` bytes (413 as soon as the declared length or the bytes received pass it, then the
  connection closes), at most `_MAX_PIPELINED` parsed requests waiting per connection (reading
  pauses beyond);
- timeouts without a timer per request: a connection must send a complete request head within
  `idle_timeout` seconds of being accepted or of its previous answer (else it is closed without an
  answer: slowloris), and a body within `body_timeout` seconds of its head (else 408 and close);
  one sweep per server checks them every quarter of the shorter timeout (at most 1 s);
- bytes the parser refuses are answered ``400`` with a one-line plain-text reason and the
  connection closes (logged at INFO, never a traceback: anyone can send them);
- backpressure: no further request of a connection is served while its transport's write buffer
  is above its high-water mark.

The handler gets a `WireRequest` (method, raw path and query, case-insensitive headers decoded as
UTF-8 with surrogate escapes, the whole body) and returns a `WireReply`; it must not raise (an
exception is logged and answered 500). No I/O besides the transport; TLS is the loop's
(`ssl_context`, with the handshake bounded by `idle_timeout`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, cast

import httptools
from multidict import CIMultiDict

__all__ = ["WireReply", "WireRequest", "WireServer"]

_MAX_PIPELINED = 16  # parsed requests waiting behind the one being served; reading pauses beyond
_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content",
    301: "Moved Permanently", 302: "Found", 304: "Not Modified",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 408: "Request Timeout", 409: "Conflict",
    410: "Gone", 412: "Precondition Failed", 413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 423: "Locked",
    429: "Too Many Requests", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class WireRequest:
    """One parsed request. `too_large` is set (and `body` empty) when the body passed the limit:
    the handler answers 413 (after routing, so a wrong path is still a 404)."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "too_large", "version")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: CIMultiDict[str],
        body: bytes,
        too_large: int | None,
        keep_alive: bool = True,
        version: str = "1.1",
    ) -> None:
        self.method = method
        self.path = path  # still percent-encoded
        self.query = query  # still percent-encoded, without the "?"
        self.headers = headers
        self.body = body
        self.too_large = too_large  # the declared length, or the bytes seen, when beyond max_body
        self.keep_alive = keep_alive  # the connection stays open after the answer
        self.version = version  # "1.1" or "1.0"


class WireReply:
    """An answer: status, body, content type and extra headers (name, value) in order."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self, status: int, body: bytes, content_type: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers


Handler = Callable[[WireRequest], Awaitable[WireReply]]


class _TooBig(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class _Conn(asyncio.Protocol):
    """One connection: parser callbacks collect requests, one task at a time serves them."""

    def __init__(self, server: WireServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[WireRequest] = collections.deque()
        self.busy = False  # a task is serving this connection's requests
        self.task: asyncio.Task[None] | None = None  # the last one started
        self.closing = False  # close once the answer being written is out; read nothing more
        self.paused_reading = False
        self.write_ready: asyncio.Future[None] | None = None  # set while the transport is paused
        # the request being parsed
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.body_parts: list[bytes] = []
        self.body_len = 0
        self.too_large: int | None = None
        self.expect_continue = False
        # deadlines (loop time) watched by the server's sweep; None when not waiting for that
        self.head_deadline: float | None = self.loop.time() + server.idle_timeout
        self.body_deadline: float | None = None
        self.in_message = False

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        self.closing = True
        self.queue.clear()
        self.head_deadline = self.body_deadline = None
        if self.write_ready is not None and not self.write_ready.done():
            self.write_ready.set_result(None)

    def pause_writing(self) -> None:
        if self.write_ready is None or self.write_ready.done():
            self.write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.write_ready is not None and not self.write_ready.done():
            self.write_ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # no upgrades here: the request parsed so far is served, then the connection closes
            # (one not complete by then is answered by the deadline sweep)
            self.closing = True
            self._pause()
        except httptools.HttpParserCallbackError as e:  # (ours, raised in a callback)
            cause = e.__context__
            if isinstance(cause, _TooBig):
                self._refuse(cause.status, str(cause))
            else:
                self.server.log.error("%s: parser callback failed", self.server.name, exc_info=cause)
                self._refuse(500, "Internal Server Error")
        except httptools.HttpParserError as e:
            self.server.log.info(
                "%s: malformed HTTP request refused (400 %s)", self.server.name, str(e).strip()[:200]
            )
            self._refuse(400, f"Bad Request: {str(e).strip()[:200]}")

    def eof_received(self) -> bool | None:
        # the client will send nothing more: finish what was parsed, then close
        if not self.busy and not self.queue:
            return None  # the transport closes itself
        self.closing = True
        return True

    # --- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = True
        self.url = b""
        self.raw_headers = []
        self.head_bytes = 0
        self.body_parts = []
        self.body_len = 0
        self.too_large = None
        self.expect_continue = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.server.max_line:
            raise _TooBig(414, f"URI Too Long: the request target exceeds {self.server.max_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        self.raw_headers.append((name, value))
        if self.head_bytes > self.server.max_head or len(self.raw_headers) > self.server.max_headers:
            raise _TooBig(
                431,
                f"Request Header Fields Too Large: at most {self.server.max_headers} fields and "
                f"{self.server.max_head} bytes",
            )

    def on_headers_complete(self) -> None:
        self.head_deadline = None
        self.body_deadline = self.loop.time() + self.server.body_timeout
        for name, value in self.raw_headers:
            if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
                self.expect_continue = True
        length = None  # (llhttp refused a malformed, repeated or smuggling Content-Length)
        for name, value in self.raw_headers:
            if len(name) == 14 and name.lower() == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _TooBig(400, "Bad Request: invalid Content-Length") from None
        if length is not None and length > self.server.max_body:
            self.too_large = length
            self._complete()  # answered 413 now; the body is not read, the connection closes
            self.closing = True
            self._pause()
            return
        if self.expect_continue and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self.too_large is not None:
            return
        self.body_len += len(body)
        if self.body_len > self.server.max_body:
            self.too_large = self.body_len
            self.body_parts = []
            self._complete()
            self.closing = True
            self._pause()
            return
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        if self.too_large is not None:
            return  # dispatched already
        self._complete()

    # --- serving ----------------------------------------------------------------------------

    def _complete(self) -> None:
        self.in_message = False
        self.body_deadline = None
        if self.closing:
            return  # parsed after a request that closes the connection (same packet): not served
        url = self.url
        q = url.find(b"?")
        if q >= 0:
            raw_path, raw_query = url[:q], url[q + 1 :]
            h = raw_query.find(b"#")
            if h >= 0:
                raw_query = raw_query[:h]
        else:
            raw_path, raw_query = url, b""
            h = raw_path.find(b"#")
            if h >= 0:
                raw_path = raw_path[:h]
        if raw_path[:1] != b"/" and raw_path != b"*":  # absolute form: http://host/path
            try:
                parsed = httptools.parse_url(url)
                raw_path = parsed.path or b"/"
                raw_query = parsed.query or b""
            except httptools.HttpParserInvalidURLError:
                pass  # the router answers 400 for a path that does not decode
        headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in self.raw_headers]
        )
        parts = self.body_parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.body_parts = []
        parser = self.parser
        keep = parser.should_keep_alive() and self.too_large is None
        req = WireRequest(
            parser.get_method().decode("ascii", "replace"),
            raw_path.decode("utf-8", "surrogateescape"),
            raw_query.decode("utf-8", "surrogateescape"),
            headers,
            body,
            self.too_large,
            keep,
            parser.get_http_version(),
        )
        if not keep:
            self.closing = True
            self._pause()
        if self.busy:
            self.queue.append(req)
            if len(self.queue) >= _MAX_PIPELINED:
                self._pause()
        else:
            self.busy = True
            self.task = self.loop.create_task(self._serve(req))  # (held: the loop keeps tasks weakly)

    def _pause(self) -> None:
        if not self.paused_reading and self.transport is not None and not self.transport.is_closing():
            self.paused_reading = True
            self.transport.pause_reading()

    async def _serve(self, req: WireRequest) -> None:
        server = self.server
        transport = self.transport
        assert transport is not None
        try:
            while True:
                try:
                    reply = await server.handler(req)
                except Exception:
                    server.log.exception("%s: %s %s failed", server.name, req.method, req.path)
                    reply = WireReply(500, b"Internal Server Error", "text/plain; charset=utf-8")
                if transport.is_closing():
                    return
                close = not req.keep_alive or (self.closing and not self.queue)
                transport.write(server.encode(reply, req, close))
                if close:
                    transport.close()
                    return
                if self.write_ready is not None and not self.write_ready.done():
                    await self.write_ready  # the client reads slower than we answer
                    if transport.is_closing():
                        return
                if not self.queue:
                    break
                req = self.queue.popleft()
        finally:
            self.busy = False
        if self.body_deadline is None:  # (else the next request's body is arriving: its deadline)
            self.head_deadline = self.loop.time() + server.idle_timeout
        if self.paused_reading and not self.closing:
            self.paused_reading = False
            transport.resume_reading()

    def _refuse(self, status: int, text: str) -> None:
        """Answer a request that cannot be parsed or is too large to read, then close."""
        self.closing = True
        self.queue.clear()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self.busy:  # (else the answer would cut into the one being written: just close)
            reply = WireReply(status, text.encode("utf-8", "replace"), "text/plain; charset=utf-8")
            transport.write(self.server.encode(reply, None, True))
        transport.close()

    def sweep(self, now: float) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.head_deadline is not None and now >= self.head_deadline and not self.busy:
            transport.close()  # no complete request head in time: closed without an answer
        elif self.body_deadline is not None and now >= self.body_deadline:
            self.body_deadline = None
            self._refuse_timeout()

    def _refuse_timeout(self) -> None:
        server = self.server
        self.closing = True
        self.queue.clear()
        transport = self.transport
        assert transport is not None
        if self.busy:
            transport.close()
            return
        reply = server.on_body_timeout()
        transport.write(server.encode(reply, None, True))
        transport.close()


class WireServer:
    """Serves `handler` on host:port (0 picks a free port; `.port` after `start`)."""

    def __init__(
        self,
        handler: Handler,
        *,
        name: str,
        max_body: int,
        idle_timeout: float,
        body_timeout: float,
        on_body_timeout: Callable[[], WireReply],
        logger: logging.Logger,
        max_line: int = 8190,
        max_head: int = 32768,
        max_headers: int = 100,
        shutdown_timeout: float = 1.0,
    ) -> None:
        self.handler = handler
        self.name = name
        self.max_body = max_body
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.on_body_timeout = on_body_timeout
        self.log = logger
        self.max_line = max_line
        self.max_head = max_head
        self.max_headers = max_headers
        self.shutdown_timeout = shutdown_timeout
        self.conns: set[_Conn] = set()
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = max(0.05, min(1.0, idle_timeout / 4, body_timeout / 4))
        self._date_second = -1
        self._date = b""

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
        tls: dict[str, Any] = (
            {} if ssl_context is None else {"ssl": ssl_context, "ssl_handshake_timeout": self.idle_timeout}
        )
        self._server = await self.loop.create_server(lambda: _Conn(self), host, port, **tls)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self.conns):
            conn.sweep(now)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    async def stop(self) -> None:
        """Stop accepting; close idle connections now, busy ones once answered (or after
        `shutdown_timeout` s)."""
        server, self._server = self._server, None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if server is None:
            return
        server.close()
        for conn in list(self.conns):
            conn.closing = True
            if not conn.busy and conn.transport is not None:
                conn.transport.close()
        deadline = self.loop.time() + self.shutdown_timeout
        while any(c.busy for c in self.conns) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        self.conns.clear()
        try:
            await asyncio.wait_for(server.wait_closed(), self.shutdown_timeout)
        except TimeoutError:
            pass

    def _date_header(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = formatdate(now, usegmt=True).encode("ascii")
        return self._date

    def encode(self, reply: WireReply, req: WireRequest | None, close: bool) -> bytes:
        """The answer to `req` (None: to a request that could not be read) as bytes: status line,
        headers, body (none for HEAD). A header with CR or LF is left out (logged): never a
        response split."""
        status = reply.status
        body = reply.body
        parts = [
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n"
            % (
                status,
                _REASONS.get(status, "Unknown").encode("ascii"),
                reply.content_type.encode("latin-1"),
                len(body),
                self._date_header(),
            )
        ]
        if reply.headers:
            for name, value in reply.headers:
                if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                    self.log.warning("%s: header %r left out of an answer: CR or LF in it", self.name, name)
                    continue
                parts.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        if close:
            parts.append(b"Connection: close\r\n")
        elif req is not None and req.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")  # (HTTP/1.0 closes unless told)
        parts.append(b"\r\n")
        if req is None or req.method != "HEAD":
            parts.append(body)
        return b"".join(parts)
