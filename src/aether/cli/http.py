"""A small synchronous client for a node's management API, used by the CLI.

A minimal HTTP/1.1 client on a plain socket (one request per connection, `Connection: close`),
so that CLI start-up stays fast (no event loop, no aiohttp, not even `http.client`, which pulls
in `ssl` and `email`) and proxy environment variables never apply to talking to a node.
"""

from __future__ import annotations

import socket
import time
from typing import TypeVar
from urllib.parse import urlencode

import msgspec

from aether.core.errors import AetherError, ConfigError
from aether.core.types import Address

DEFAULT_CONNECT = "127.0.0.1:9000"

# The server's own deadlines: store writes and map operations retry for 5 s, an invoke waits 10 s
# by default. A client that gave up at the same moment would report "cannot reach" instead of the
# node's answer (e.g. a 503 naming the missing quorum), so the default is well above them all.
SERVER_DEADLINE = 10.0
DEFAULT_TIMEOUT = 15.0

_T = TypeVar("_T")


class ApiUnreachable(AetherError):
    """The node could not be reached at all (refused, timed out, name not resolved)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot reach the Aether node at {address} ({reason})")
        self.address = address
        self.reason = reason


class ApiNoAnswer(ApiUnreachable):
    """The node took the request but did not answer within the client's timeout (it runs, it is
    slow, or the timeout is shorter than the operation)."""

    def __init__(self, address: str, timeout: float) -> None:
        AetherError.__init__(
            self, f"the Aether node at {address} took the request but gave no answer within {timeout:g} s"
        )
        self.address = address
        self.reason = f"no answer within {timeout:g} s"
        self.timeout = timeout


class ApiError(AetherError):
    """The node answered with an HTTP error; `title`/`detail` come from its problem document."""

    def __init__(self, address: str, status: int, title: str, detail: str) -> None:
        super().__init__(f"{address} answered {status} {title}: {detail}")
        self.address = address
        self.status = status
        self.title = title
        self.detail = detail


class _NoAnswer(TimeoutError):
    """Connected and sent, but the answer did not arrive in time."""


class _Problem(msgspec.Struct):
    title: str = ""
    status: int = 0
    detail: str = ""
    type: str = "about:blank"


def _parse_response(raw: bytes) -> tuple[int, str, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise OSError("incomplete HTTP answer" if raw else "the connection closed without an answer")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise OSError(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    elif headers.get("content-length", "").isdigit():
        length = int(headers["content-length"])
        if len(body) < length:
            raise OSError("the connection closed in the middle of the answer")
        body = body[:length]
    return int(parts[1]), parts[2] if len(parts) > 2 else "", body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise OSError("truncated chunked answer")
        try:
            size = int(data[pos:end].split(b";", 1)[0].strip() or b"0", 16)
        except ValueError:
            raise OSError("malformed chunked answer") from None
        if size == 0:
            return bytes(out)
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2


def parse_connect(text: str) -> Address:
    """Parse a `--connect` value: `HOST:PORT`, optionally with an `http://` prefix."""
    t = text.strip()
    if t.startswith("http://"):
        t = t[len("http://") :]
    t = t.rstrip("/")
    try:
        return Address.parse(t)
    except ConfigError:
        raise ConfigError(
            f"invalid --connect value {text!r}: expected HOST:PORT, e.g. {DEFAULT_CONNECT}"
        ) from None


class ManagementClient:
    """Talks JSON to one node's management API (one short connection per request)."""

    def __init__(
        self, address: Address | str, *, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.address = address if isinstance(address, Address) else parse_connect(address)
        self.api_key = api_key or None
        self.timeout = timeout

    def get_raw(self, path: str, params: dict[str, str] | None = None) -> bytes:
        """GET `path` (e.g. `/api/v1/status`) and return the body of a 2xx answer."""
        return self.request_raw("GET", path, params)

    def send_json(self, method: str, path: str, payload: object | None = None) -> object:
        """POST/PUT/DELETE `payload` as JSON to `path`; return the decoded JSON answer (or None)."""
        body = None if payload is None else msgspec.json.encode(payload)
        raw = self.request_raw(method, path, None, body, "application/json")
        if not raw.strip():
            return None
        try:
            return msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ApiError(str(self.address), 200, "Bad response", "the answer is not JSON") from None

    def request_raw(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> bytes:
        """Send one request and return the body of a 2xx answer (ApiError / ApiUnreachable otherwise)."""
        addr = str(self.address)
        try:
            status, reason, body = self._request(
                method, path + ("?" + urlencode(params) if params else ""), body, content_type
            )
        except ConnectionRefusedError:
            raise ApiUnreachable(addr, "connection refused") from None
        except _NoAnswer:
            raise ApiNoAnswer(addr, self.timeout) from None
        except TimeoutError:
            raise ApiUnreachable(addr, f"no connection within {self.timeout:g} s") from None
        except socket.gaierror as e:
            raise ApiUnreachable(addr, f"cannot resolve host: {e.strerror or e}") from None
        except OSError as e:
            raise ApiUnreachable(addr, e.strerror or str(e) or type(e).__name__) from None
        if status >= 400:
            try:
                p = msgspec.json.decode(body, type=_Problem)
                title, detail = p.title or reason, p.detail or body.decode(errors="replace")
            except (msgspec.DecodeError, msgspec.ValidationError):
                title, detail = reason, body.decode(errors="replace").strip()[:500]
            raise ApiError(addr, status, title, detail)
        if status >= 300:
            raise ApiError(addr, status, reason, "unexpected redirect")
        return body

    def _request(
        self, method: str, target: str, body: bytes | None = None, content_type: str = "application/json"
    ) -> tuple[int, str, bytes]:
        """One request on a fresh connection; returns (status, reason, body)."""
        host = self.address.host.strip("[]")
        host_header = f"[{host}]" if ":" in host else host
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {host_header}:{self.address.port}",
            "Accept: application/json",
            "User-Agent: aether-cli",
            "Connection: close",
        ]
        if self.api_key:
            lines.append(f"X-API-Key: {self.api_key}")
        if body is not None:
            lines.append(f"Content-Type: {content_type}")
            lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + (body or b"")
        deadline = time.monotonic() + self.timeout
        with socket.create_connection((host, self.address.port), timeout=self.timeout) as sock:
            sock.sendall(request)
            chunks: list[bytes] = []
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _NoAnswer
                sock.settimeout(remaining)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    raise _NoAnswer from None
                if not data:
                    break
                chunks.append(data)
        return _parse_response(b"".join(chunks))

    def get_json(self, path: str, params: dict[str, str] | None = None) -> object:
        """GET `path` and decode its JSON body."""
        body = self.get_raw(path, params)
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise ApiError(str(self.address), 200, "Bad response", "the answer is not JSON") from None

    def get_typed(self, path: str, into: type[_T], params: dict[str, str] | None = None) -> _T:
        """GET `path` and decode its JSON body into `into` (a msgspec-compatible type)."""
        body = self.get_raw(path, params)
        try:
            return msgspec.json.decode(body, type=into)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ApiError(str(self.address), 200, "Bad response", f"unexpected answer: {e}") from None
