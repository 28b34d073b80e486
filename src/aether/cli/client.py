"""The CLI's synchronous client of a node's management API, on aiohttp's HTTP client.

Each call runs one request on its own event loop (`asyncio.run`) with a fresh session and
connection, so the commands stay plain synchronous click functions; `events` follows the
`GET /api/v1/events` stream as a generator. aiohttp is imported on the first request, never
at start-up (`aether --help` does not pay for it). Proxy environment variables never apply to
talking to a node (aiohttp's default, ``trust_env=False``).

HTTPS (``https://HOST:PORT``): TLS 1.2+, the node's certificate verified against the system
trust store and the CA file given (`--ca` / AETHER_CA), and the host name or IP address checked
against it. `client_for` also finds a local cluster started with `aether cluster start --tls`
that has a node at the address, and uses HTTPS and that cluster's CA for it
(docs/cluster-security.md, *HTTPS*).

Failures are raised as the CLI reports them: `ApiUnreachable` (no connection; `ApiTlsError`
for TLS, `ApiNoAnswer` when the node took the request but did not answer in time) and
`ApiError` (an HTTP error answer, with its problem document's title and detail).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlencode

import msgspec

from aether.core.errors import AetherError, ConfigError
from aether.core.problem import decode_problem
from aether.core.types import Address

if TYPE_CHECKING:
    import aiohttp

DEFAULT_CONNECT = "127.0.0.1:9000"
DEFAULT_CLUSTER_DIR = ".aether/cluster"  # same as aether.cli.local_cluster.DEFAULT_DIR

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


class ApiTlsError(ApiUnreachable):
    """The TLS handshake with the node failed: its certificate cannot be verified, or one side
    does not speak TLS. `hint` says what to do."""

    def __init__(self, address: str, message: str, hint: str) -> None:
        AetherError.__init__(self, message)
        self.address = address
        self.reason = message
        self.hint = hint


class ApiError(AetherError):
    """The node answered with an HTTP error; `title`/`detail` come from its problem document."""

    status: int  # always an HTTP status here (the base class allows None)

    def __init__(self, address: str, status: int, title: str, detail: str) -> None:
        super().__init__(f"{address} answered {status} {title}: {detail}")
        self.address = address
        self.status = status
        self.title = title
        self.detail = detail


class StreamLost(Exception):
    """An open event stream ended, failed, or stayed silent for longer than its read timeout."""


@dataclass(frozen=True)
class Answer:
    """A complete answer of the node, whatever its status."""

    status: int
    reason: str
    body: bytes


@dataclass(frozen=True)
class ServerEvent:
    """One server-sent event: its `id:` (None if it has none), `event:` and `data:` lines."""

    id: str | None
    event: str
    data: str


def parse_target(text: str) -> tuple[str | None, Address]:
    """Parse a `--connect` value: `HOST:PORT`, optionally with an `http://` or `https://` prefix;
    returns (scheme or None, address)."""
    t = text.strip()
    scheme: str | None = None
    for prefix in ("http://", "https://"):
        if t.lower().startswith(prefix):
            scheme, t = prefix[:-3], t[len(prefix) :]
            break
    t = t.rstrip("/")
    try:
        return scheme, Address.parse(t)
    except ConfigError:
        raise ConfigError(
            f"invalid --connect value {text!r}: expected HOST:PORT or https://HOST:PORT, "
            f"e.g. {DEFAULT_CONNECT}"
        ) from None


def parse_connect(text: str) -> Address:
    """The address of a `--connect` value (`parse_target` without the scheme)."""
    return parse_target(text)[1]


def local_cluster_ca(address: Address, directory: str | Path = DEFAULT_CLUSTER_DIR) -> str | None:
    """The CA certificate of the local cluster recorded in `directory` if it was started with
    TLS (`aether cluster start --tls`) and has a node whose management API is at `address`."""
    path = Path(directory) / "cluster.json"
    try:
        doc: Any = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("tls_ca"), str) or not doc["tls_ca"]:
        return None
    host = str(doc.get("host", "")).strip("[]")
    nodes: list[Any] = doc["nodes"] if isinstance(doc.get("nodes"), list) else []
    if address.host.strip("[]") != host and not (
        address.host in ("localhost",) and host in ("127.0.0.1", "::1")
    ):
        return None
    if any(isinstance(n, dict) and n.get("management_port") == address.port for n in nodes):
        ca = doc["tls_ca"]
        return ca if Path(ca).is_absolute() else str(Path(directory) / ca)
    return None


def client_for(
    target: str,
    *,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    ca: str | None = None,
    cluster_dir: str | Path = DEFAULT_CLUSTER_DIR,
) -> ManagementClient:
    """A client for a `--connect` value. `https://` means HTTPS and `http://` plain HTTP; a bare
    HOST:PORT means HTTPS if it is a node of the local cluster in `cluster_dir` started with
    TLS, plain HTTP otherwise. Over HTTPS the certificate is verified against the system trust
    store and `ca` (default: that local cluster's CA, if the address is one of its nodes)."""
    scheme, address = parse_target(target)
    if scheme != "http":
        found = local_cluster_ca(address, cluster_dir)
        if scheme is None and found is not None:
            scheme = "https"
        if ca is None:
            ca = found
    return ManagementClient(address, api_key=api_key, timeout=timeout, https=scheme == "https", ca=ca)


class _Connected:
    """Set by aiohttp's tracing once the connection (TCP and TLS) is up: a timeout after that is
    "took the request but gave no answer", before it "no connection"."""

    def __init__(self) -> None:
        self.up = False

    async def on_connection_create_end(self, *_: object) -> None:
        self.up = True


class ManagementClient:
    """Talks JSON to one node's management API (one short connection per request)."""

    def __init__(
        self,
        address: Address | str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        https: bool | None = None,
        ca: str | None = None,
    ) -> None:
        scheme: str | None = None
        if isinstance(address, Address):
            self.address = address
        else:
            scheme, self.address = parse_target(address)
        # an explicit scheme in `address` wins; else `https`
        self.https = scheme == "https" if scheme is not None else bool(https)
        self.ca = ca or None
        self.api_key = api_key or None
        self.timeout = timeout
        self._tls: ssl.SSLContext | None = None  # made on first use

    @property
    def target(self) -> str:
        """The node as a `--connect` value: ``HOST:PORT``, or ``https://HOST:PORT``."""
        return f"https://{self.address}" if self.https else str(self.address)

    # -- the synchronous face ---------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Answer:
        """Send one request and return the node's answer, whatever its status (ApiUnreachable
        and its subclasses if there is none)."""
        return _run(self._request(method, path, params, body, content_type))

    def request_raw(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> bytes:
        """Send one request and return the body of a 2xx answer (ApiError / ApiUnreachable otherwise)."""
        return self.check(self.request(method, path, params, body, content_type))

    def upload(
        self,
        path: str,
        file: Path,
        params: dict[str, str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        *,
        rate: float = 1024 * 1024,
    ) -> bytes:
        """PUT the bytes of `file` to `path`, streamed (`progress(sent, total)` after each piece);
        the body of a 2xx answer. The timeout grows by one second per `rate` bytes."""
        size = file.stat().st_size
        timeout = self.timeout + size / rate
        return self.check(_run(self._upload(path, file, size, params, progress, timeout)))

    async def _upload(
        self, path: str, file: Path, size: int, params: dict[str, str] | None,
        progress: Callable[[int, int], None] | None, timeout: float,
    ) -> Answer:
        async def body() -> AsyncGenerator[bytes, None]:
            sent = 0
            with open(file, "rb") as f:
                while data := f.read(256 * 1024):
                    yield data
                    sent += len(data)
                    if progress is not None:
                        progress(sent, size)

        connected = _Connected()
        try:
            tls = self._ssl()
            async with asyncio.timeout(timeout), self._session(connected) as session:
                headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
                async with session.put(
                    self._url(path, params), data=body(), headers=headers, ssl=tls, allow_redirects=False
                ) as resp:
                    return Answer(resp.status, resp.reason or "", await resp.read())
        except Exception as e:
            raise self.unreachable(e, connected.up) from None

    def get_raw(self, path: str, params: dict[str, str] | None = None) -> bytes:
        """GET `path` (e.g. `/api/v1/status`) and return the body of a 2xx answer."""
        return self.request_raw("GET", path, params)

    def get_json(self, path: str, params: dict[str, str] | None = None) -> object:
        """GET `path` and decode its JSON body."""
        return self._json(self.get_raw(path, params))

    def get_typed(self, path: str, into: type[_T], params: dict[str, str] | None = None) -> _T:
        """GET `path` and decode its JSON body into `into` (the msgspec type the node encodes)."""
        return self.decode(self.get_raw(path, params), into)

    def send_json(self, method: str, path: str, payload: object | None = None) -> object:
        """POST/PUT/DELETE `payload` as JSON to `path`; return the decoded JSON answer (or None)."""
        body = None if payload is None else msgspec.json.encode(payload)
        raw = self.request_raw(method, path, None, body, "application/json")
        return self._json(raw) if raw.strip() else None

    def decode(self, body: bytes, into: type[_T]) -> _T:
        """Decode a 2xx answer into `into`; an ApiError if it does not match."""
        try:
            return msgspec.json.decode(body, type=into)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ApiError(self.target, 200, "Bad response", f"unexpected answer: {e}") from None

    def _json(self, body: bytes) -> object:
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise ApiError(self.target, 200, "Bad response", "the answer is not JSON") from None

    def check(self, answer: Answer) -> bytes:
        """The body of a 2xx answer; an ApiError with the problem document's title and detail
        otherwise."""
        status, reason, body = answer.status, answer.reason, answer.body
        if status >= 400:
            p = decode_problem(body, status, reason)  # the one problem type servers and clients share
            title, detail = p.title, p.detail
            raise ApiError(self.target, status, title, detail)
        if status >= 300:
            raise ApiError(self.target, status, reason, "unexpected redirect")
        return body

    def events(self, read_timeout: float, path: str = "/api/v1/events") -> Iterator[ServerEvent]:
        """Follow the server-sent events of `path`, one `ServerEvent` at a time, until the
        caller stops. Raises ApiUnreachable if the stream cannot be opened, ApiError on an HTTP
        error answer, and StreamLost when the open stream ends, fails, or brings neither an
        event nor a heartbeat for `read_timeout` seconds."""
        with asyncio.Runner() as runner:
            stream = self._events(path, read_timeout)
            try:
                while True:
                    try:
                        yield runner.run(stream.__anext__())
                    except StopAsyncIteration:
                        return
            finally:
                runner.run(stream.aclose())

    # -- aiohttp --------------------------------------------------------------------------------------

    def _url(self, path: str, params: dict[str, str] | None) -> Any:
        from yarl import URL

        host = self.address.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        query = "?" + urlencode(params) if params else ""
        scheme = "https" if self.https else "http"
        return URL(f"{scheme}://{host}:{self.address.port}{path}{query}", encoded=True)

    def _session(self, connected: _Connected) -> aiohttp.ClientSession:
        import aiohttp

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(connected.on_connection_create_end)
        headers = {"Accept": "application/json", "User-Agent": "aether-cli"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            trace_configs=[trace],
        )
        # aiohttp sends a GET, PUT or DELETE again when the server drops the connection (meant
        # for kept-alive connections; ours are fresh). A map write must never be repeated
        # behind the user's back, and a node that drops requests is reported, not retried.
        # There is no public switch: aiohttp's own test client sets the same attribute.
        session._retry_connection = False
        return session

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.https:
            return False
        if self._tls is None:
            ctx = ssl.create_default_context()  # the system trust store, host names checked
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.ca:
                try:
                    ctx.load_verify_locations(cafile=self.ca)
                except (OSError, ssl.SSLError) as e:
                    raise ConfigError(
                        f"cannot use the CA certificate {self.ca} (--ca / AETHER_CA): "
                        f"{getattr(e, 'strerror', None) or e}"
                    ) from None
            self._tls = ctx
        return self._tls

    async def _request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: bytes | None,
        content_type: str,
    ) -> Answer:
        connected = _Connected()
        try:
            tls = self._ssl()
            async with asyncio.timeout(self.timeout), self._session(connected) as session:
                headers = {"Content-Type": content_type} if body is not None else None
                async with session.request(
                    method, self._url(path, params), data=body, headers=headers, ssl=tls,
                    allow_redirects=False,
                ) as resp:
                    return Answer(resp.status, resp.reason or "", await resp.read())
        except Exception as e:
            raise self.unreachable(e, connected.up) from None

    async def _events(self, path: str, read_timeout: float) -> AsyncGenerator[ServerEvent, None]:
        connected = _Connected()
        try:
            tls = self._ssl()
            session = self._session(connected)
        except Exception as e:
            raise self.unreachable(e, connected.up) from None
        async with session:
            try:
                async with asyncio.timeout(self.timeout):
                    resp = await session.get(
                        self._url(path, None), headers={"Accept": "text/event-stream"}, ssl=tls,
                        allow_redirects=False,
                    )
                    if resp.status != 200:
                        self.check(Answer(resp.status, resp.reason or "", await resp.read()))
            except (ApiError, ApiUnreachable):
                raise
            except Exception as e:
                raise self.unreachable(e, connected.up) from None
            async with resp:
                async for event in _server_events(resp, read_timeout):
                    yield event

    def unreachable(self, e: BaseException, connected: bool = False) -> ApiUnreachable:
        """The ApiUnreachable (ApiNoAnswer, ApiTlsError) for an exception of a request;
        `connected`: the connection was up when it happened."""
        import aiohttp

        addr = self.target
        if isinstance(e, ApiUnreachable):
            return e
        if isinstance(e, ConfigError):  # the CA file
            return ApiTlsError(addr, str(e), "Pass a PEM CA certificate with --ca FILE (or AETHER_CA).")
        if isinstance(e, TimeoutError):  # asyncio.timeout, aiohttp's connect timeout
            if connected:
                return ApiNoAnswer(addr, self.timeout)
            return ApiUnreachable(addr, f"no connection within {self.timeout:g} s")
        if isinstance(e, aiohttp.ClientConnectorCertificateError) and isinstance(
            e.certificate_error, ssl.SSLError
        ):
            return self._tls_error(e.certificate_error)
        if isinstance(e, aiohttp.ClientConnectorError):  # before the request was sent
            os_error: OSError = e.os_error
            if isinstance(os_error, ConnectionRefusedError):
                return ApiUnreachable(addr, "connection refused")
            if isinstance(os_error, socket.gaierror):
                return ApiUnreachable(addr, f"cannot resolve host: {os_error.strerror or os_error}")
            if isinstance(os_error, ssl.SSLError):
                return self._tls_error(os_error)
            return ApiUnreachable(addr, os_error.strerror or str(os_error) or type(os_error).__name__)
        if isinstance(e, ssl.SSLError):
            return self._tls_error(e)
        if isinstance(e, aiohttp.ServerDisconnectedError):
            if not self.https:  # what a node serving HTTPS does to a plain HTTP request
                return ApiTlsError(
                    addr, f"the Aether node at {addr} closed the connection without an answer: it may "
                    "serve HTTPS", f"Connect with --connect https://{self.address} (and --ca FILE).",
                )
            return ApiUnreachable(addr, "the connection closed without an answer")
        if isinstance(e, aiohttp.ClientPayloadError):
            return ApiUnreachable(addr, "the connection closed in the middle of the answer")
        if isinstance(e, aiohttp.ClientResponseError):  # the answer is not HTTP
            return ApiUnreachable(addr, f"not an HTTP answer: {e.message[:80]!r}")
        if isinstance(e, OSError):
            return ApiUnreachable(addr, e.strerror or str(e) or type(e).__name__)
        return ApiUnreachable(addr, str(e) or type(e).__name__)

    def _tls_error(self, e: ssl.SSLError) -> ApiTlsError:
        """The ApiTlsError for an `ssl` exception of a request."""
        addr = self.target
        if isinstance(e, ssl.SSLCertVerificationError):
            why = e.verify_message or e.reason or str(e)
            if "mismatch" in why or "Hostname" in why:
                hint = (
                    f"The certificate does not name {self.address.host}: connect by a name or address "
                    f"it names, or issue it with `aether cert issue NODE_ID --san {self.address.host}`."
                )
            elif "expired" in why:
                hint = "Issue the node a new certificate (`aether cert issue NODE_ID`) and restart it."
            else:
                hint = (
                    "Pass the CA certificate that issued the node's certificate with --ca FILE (or "
                    "AETHER_CA); for a local cluster started with --tls it is DIR/tls/ca.crt."
                )
            return ApiTlsError(
                addr, f"cannot verify the certificate of the Aether node at {addr}: certificate verify "
                f"failed: {why}", hint
            )
        reason = e.reason or str(e)
        if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL",
                      "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
            return ApiTlsError(
                addr, f"the Aether node at {addr} does not speak HTTPS ({reason})",
                f"It serves plain HTTP: connect with --connect http://{self.address}.",
            )
        return ApiTlsError(addr, f"TLS handshake with the Aether node at {addr} failed: {reason}",
                           "Check the node's --http-tls-cert and the --ca you pass.")


async def _server_events(
    resp: aiohttp.ClientResponse, read_timeout: float
) -> AsyncGenerator[ServerEvent, None]:
    """The events of an open `text/event-stream` answer (the WHATWG field rules: `id`, `event`,
    `data` lines, a blank line ends an event, `:` starts a comment such as a heartbeat).
    aiohttp reads the lines (chunked transfer, TLS); StreamLost when the stream ends, fails or
    stays silent for `read_timeout` seconds."""
    ev_id: str | None = None
    ev_type, data_lines = "message", list[str]()
    while True:
        try:
            async with asyncio.timeout(read_timeout):
                raw = await resp.content.readline()
        except TimeoutError:
            raise StreamLost(f"no event or heartbeat for {read_timeout:g} s") from None
        except Exception as e:
            raise StreamLost(str(e) or type(e).__name__) from None
        if not raw:
            raise StreamLost("the node closed the stream")
        line = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
        if not line:
            if data_lines:
                yield ServerEvent(ev_id, ev_type, "\n".join(data_lines))
            ev_type, data_lines = "message", []
            continue
        if line.startswith(":"):
            continue  # a comment: heartbeat
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            ev_id = value
        elif name == "event":
            ev_type = value
        elif name == "data":
            data_lines.append(value)


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run `coro` on a new event loop (the CLI is synchronous; one loop per request)."""
    return asyncio.run(coro)
