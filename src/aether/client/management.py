"""The typed client of a node's management API (`/api/v1/`), synchronous and asynchronous.

`ManagementClient` (blocking: each call runs one request on its own event loop) and
`AsyncManagementClient` (awaitable, for asyncio programs and agents) talk JSON to one node over
HTTP or HTTPS, with one short connection per request. Both have the same methods: typed calls
(`status()`, `slices()`, `apply_blueprint()`, `deploy()`, `scale()`, `invoke()`, `events()`, ...)
that return msgspec structs where the API defines them (`aether.core.status.NodeStatus`,
`aether.deploy.operations.SliceStatus`, `aether.kv.keys.BlueprintValue`) and plain JSON data
otherwise, and the raw calls under them (`request`, `get_json`, `send_json`, ...). The `aether`
command uses this client for everything it asks a node (docs/agent-api.md shows it beside curl).

Failures are typed exceptions (all `aether.core.errors.AetherError`): `ApiError` is an HTTP error
answer and carries its `status` and the node's RFC 9457 problem document (`problem`, `title`,
`detail`); `ApiUnreachable` means no answer at all, with the subclasses `ApiNoAnswer` (the node
took the request but did not answer within the timeout) and `ApiTlsError` (the TLS handshake
failed; `hint` says what to do). An open event stream that ends raises `StreamLost`.

HTTPS (``https://HOST:PORT``): TLS 1.2+, the node's certificate verified against the system
trust store and the CA file given (`ca=`), and the host name or IP address checked against it.
aiohttp is imported on the first request, never at import time. Proxy environment variables never
apply to talking to a node (aiohttp's default, ``trust_env=False``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

import msgspec

from aether.core.errors import AetherError, ConfigError
from aether.core.problem import Problem, decode_problem
from aether.core.status import KVEntry, NodeStatus
from aether.core.types import Address

if TYPE_CHECKING:
    import aiohttp

    from aether.deploy.operations import SliceStatus
    from aether.kv.keys import BlueprintValue

__all__ = [
    "DEFAULT_TIMEOUT",
    "Answer",
    "ApiError",
    "ApiNoAnswer",
    "ApiTlsError",
    "ApiUnreachable",
    "AsyncManagementClient",
    "ManagementClient",
    "ServerEvent",
    "StreamLost",
    "parse_target",
]

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


class ApiTlsError(ApiUnreachable):
    """The TLS handshake with the node failed: its certificate cannot be verified, or one side
    does not speak TLS. `hint` says what to do."""

    def __init__(self, address: str, message: str, hint: str) -> None:
        AetherError.__init__(self, message)
        self.address = address
        self.reason = message
        self.hint = hint


class ApiError(AetherError):
    """The node answered with an HTTP error: its `status`, and its RFC 9457 problem document
    (`problem`; `title`, `detail` and `kind` (the problem's ``type``) from it). `body` is the
    whole answer as JSON when it is an object: some problems carry more fields (a 503 of
    `/api/v1/health` has ``ready`` and ``reason``)."""

    status: int  # always an HTTP status here (the base class allows None)

    def __init__(
        self,
        address: str,
        status: int,
        title: str,
        detail: str,
        *,
        problem: Problem | None = None,
        body: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{address} answered {status} {title}: {detail}")
        self.address = address
        self.status = status
        self.title = title
        self.detail = detail
        self.problem = problem if problem is not None else Problem("about:blank", title, status, detail)
        self.kind = self.problem.type
        self.body: dict[str, Any] = body or {}
        # the answer's Retry-After in seconds (the node says trying again soon is worth it), else None
        self.retry_after = retry_after


def _seconds(retry_after: str | None) -> float | None:
    """A Retry-After header in seconds (its delay-seconds form; None for none, or an HTTP date)."""
    if retry_after is None:
        return None
    try:
        value = float(retry_after.strip())
    except ValueError:
        return None
    return value if 0 <= value < 86400 else None


class StreamLost(Exception):
    """An open event stream ended, failed, or stayed silent for longer than its read timeout."""


@dataclass(frozen=True)
class Answer:
    """A complete answer of the node, whatever its status."""

    status: int
    reason: str
    body: bytes
    retry_after: str | None = None  # the Retry-After header, if any


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


class _Connected:
    """Set by aiohttp's tracing once the connection (TCP and TLS) is up: a timeout after that is
    "took the request but gave no answer", before it "no connection"."""

    def __init__(self) -> None:
        self.up = False

    async def on_connection_create_end(self, *_: object) -> None:
        self.up = True


class _Base:
    """What both faces share: the node's address, TLS, the aiohttp requests and error mapping."""

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

    def _health(self, answer: Answer) -> dict[str, Any]:
        """The health document of a `GET /api/v1/health` answer: 200 and 503 both carry one."""
        try:
            doc = msgspec.json.decode(answer.body)
        except msgspec.DecodeError:
            doc = None
        if answer.status in (200, 503) and isinstance(doc, dict) and "ready" in doc:
            return doc
        self.check(answer)  # an error answer: ApiError with its problem document
        raise ApiError(self.target, answer.status, answer.reason, "unexpected answer: no `ready` field")

    def check(self, answer: Answer) -> bytes:
        """The body of a 2xx answer; an ApiError with the problem document's title and detail
        otherwise."""
        status, reason, body = answer.status, answer.reason, answer.body
        if status >= 400:
            p = decode_problem(body, status, reason)  # the one problem type servers and clients share
            try:
                doc = msgspec.json.decode(body)
            except msgspec.DecodeError:
                doc = None
            raise ApiError(
                self.target, status, p.title, p.detail, problem=p,
                body=doc if isinstance(doc, dict) else None, retry_after=_seconds(answer.retry_after),
            )
        if status >= 300:
            raise ApiError(self.target, status, reason, "unexpected redirect")
        return body

    async def _upload(
        self,
        path: str,
        file: Path,
        size: int,
        params: dict[str, str] | None,
        progress: Callable[[int, int], None] | None,
        timeout: float,
    ) -> Answer:
        async def body() -> AsyncGenerator[bytes, None]:
            sent = 0
            with open(file, "rb") as f:
                while data := f.read(256 * 1024):
                    yield data
                    sent += len(data)
                    if progress is not None:
                        progress(sent, size)

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        return await self._send("PUT", path, params, body(), headers, timeout)

    def _url(self, path: str, params: dict[str, str] | None) -> Any:
        from yarl import URL

        # Text the shell could not decode (`aether kv list $'\\xff'`: a lone surrogate) cannot be
        # sent; it used to fail inside the request and be reported as "cannot reach the node".
        parts = [("path", path), *((f"query parameter {k!r}", v) for k, v in (params or {}).items())]
        for what, text in parts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ConfigError(
                    f"{what} {text[:200]!r} is not UTF-8 text ({e.reason} at position {e.start}): "
                    "nodes take UTF-8 only; check the argument's bytes and your locale"
                ) from None
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
        longer: float = 0.0,
    ) -> Answer:
        """One request; `longer`: seconds the node may hold it beyond the client's timeout (a
        wait or an invoke with its own timeout)."""
        headers = {"Content-Type": content_type} if body is not None else None
        return await self._send(method, path, params, body, headers, self.timeout + longer)

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        data: object,
        headers: dict[str, str] | None,
        timeout: float,
    ) -> Answer:
        """Send `data` (bytes, an async generator of bytes, or None) and read the whole answer,
        all within `timeout` seconds; ApiUnreachable (and its subclasses) when there is no answer."""
        connected = _Connected()
        url = self._url(path, params)  # ConfigError for text that cannot be sent: not unreachable
        try:
            tls = self._ssl()
            async with (
                asyncio.timeout(timeout),
                self._session(connected) as session,
                session.request(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    ssl=tls,
                    allow_redirects=False,
                ) as resp,
            ):
                body = await resp.read()
                return Answer(resp.status, resp.reason or "", body, resp.headers.get("Retry-After"))
        except Exception as e:
            raise self.unreachable(e, connected.up, timeout) from None

    async def _events(self, path: str, read_timeout: float) -> AsyncGenerator[ServerEvent, None]:
        connected = _Connected()
        url = self._url(path, None)
        try:
            tls = self._ssl()
            session = self._session(connected)
        except Exception as e:
            raise self.unreachable(e, connected.up) from None
        async with session:
            try:
                async with asyncio.timeout(self.timeout):
                    resp = await session.get(
                        url,
                        headers={"Accept": "text/event-stream"},
                        ssl=tls,
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

    def unreachable(
        self, e: BaseException, connected: bool = False, timeout: float | None = None
    ) -> ApiUnreachable:
        """The ApiUnreachable (ApiNoAnswer, ApiTlsError) for an exception of a request;
        `connected`: the connection was up when it happened; `timeout`: the request's own, when
        not the client's (an upload's, a wait's: the message used to name the client's)."""
        import aiohttp

        addr = self.target
        timeout = self.timeout if timeout is None else timeout
        if isinstance(e, ApiUnreachable):
            return e
        if isinstance(e, ConfigError):  # the CA file
            return ApiTlsError(addr, str(e), "Pass a PEM CA certificate with --ca FILE (or AETHER_CA).")
        if isinstance(e, TimeoutError):  # asyncio.timeout, aiohttp's connect timeout
            if connected:
                return ApiNoAnswer(addr, timeout)
            return ApiUnreachable(addr, f"no connection within {timeout:g} s")
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
                    addr,
                    f"the Aether node at {addr} closed the connection without an answer: it may serve HTTPS",
                    f"Connect with --connect https://{self.address} (and --ca FILE).",
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
                addr,
                f"cannot verify the certificate of the Aether node at {addr}: certificate verify "
                f"failed: {why}",
                hint,
            )
        reason = e.reason or str(e)
        if reason in (
            "WRONG_VERSION_NUMBER",
            "RECORD_LAYER_FAILURE",
            "UNKNOWN_PROTOCOL",
            "PACKET_LENGTH_TOO_LONG",
            "HTTP_REQUEST",
        ):
            return ApiTlsError(
                addr,
                f"the Aether node at {addr} does not speak HTTPS ({reason})",
                f"It serves plain HTTP: connect with --connect http://{self.address}.",
            )
        return ApiTlsError(
            addr,
            f"TLS handshake with the Aether node at {addr} failed: {reason}",
            "Check the node's --http-tls-cert and the --ca you pass.",
        )


class ManagementClient(_Base):
    """The blocking client of one node's management API (one short connection per request).

    `address` is ``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST:PORT``; `api_key` is sent as
    ``X-API-Key``; `ca` is a PEM CA certificate that verifies the node's HTTPS certificate besides
    the system trust store; `timeout` bounds each request (seconds). Every call raises `ApiError`
    for an HTTP error answer and `ApiUnreachable` (`ApiNoAnswer`, `ApiTlsError`) when there is none.
    """

    # -- typed calls ----------------------------------------------------------------------------------

    def status(self) -> NodeStatus:
        """`GET /api/v1/status`: the cluster as this node sees it."""
        return self.get_typed("/api/v1/status", NodeStatus)

    def health(self) -> dict[str, Any]:
        """`GET /api/v1/health`: ``{"ready": true, ...}``, or ``ready: false`` with a ``reason``
        (the 503 answer is returned, not raised)."""
        return self._health(self.request("GET", "/api/v1/health"))

    def nodes(self) -> list[dict[str, Any]]:
        """`GET /api/v1/nodes`: ``[{"id", "address", "state", "leader"}]``."""
        return _list(self.get_json("/api/v1/nodes"))

    def kv(self, prefix: str = "") -> list[KVEntry]:
        """`GET /api/v1/kv?prefix=P`: the replicated store's keys under `prefix`, with values."""
        return self.decode(self.get_raw("/api/v1/kv", {"prefix": prefix}), _KVListing).entries

    def slices(self) -> list[SliceStatus]:
        """`GET /api/v1/slices`: desired and ACTIVE instances per artifact, per-node states."""
        return self.decode(self.get_raw("/api/v1/slices"), _slice_statuses())

    def blueprints(self) -> list[dict[str, Any]]:
        """`GET /api/v1/blueprints`: the stored blueprints."""
        return _list(self.get_json("/api/v1/blueprints"))

    def apply_blueprint(self, toml: str, filename: str = "blueprint.toml") -> dict[str, Any]:
        """`POST /api/v1/blueprints`: parse, expand and store the blueprint `toml` (replacing one
        with the same id); the expanded blueprint."""
        return _dict(self.send_json("POST", "/api/v1/blueprints", {"toml": toml, "filename": filename}))

    def wait_blueprint(self, blueprint_id: str, timeout: float = 60.0) -> list[SliceStatus]:
        """`POST /api/v1/blueprints/{id}/wait`: the statuses once every instance is ACTIVE (an
        ApiError 409 if one FAILED, 504 after `timeout` seconds)."""
        path, params = _wait_path(blueprint_id, timeout)
        answer = _run(self._request("POST", path, params, None, "application/json", longer=timeout))
        return self.decode(self.check(answer), _slice_statuses())

    def delete_blueprint(self, blueprint_id: str) -> dict[str, Any]:
        """`DELETE /api/v1/blueprints/{id}`: its slices are undeployed unless another lists them."""
        return _dict(self.send_json("DELETE", f"/api/v1/blueprints/{_seg(blueprint_id)}"))

    def deploy(self, artifact: str, instances: int = 1) -> BlueprintValue:
        """`POST /api/v1/deploy`: deploy `artifact` (G:A:V) as the blueprint ``direct:G:A``."""
        body = msgspec.json.encode({"artifact": artifact, "instances": instances})
        return self.decode(self.request_raw("POST", "/api/v1/deploy", None, body), _blueprint_value())

    def scale(self, artifact: str, instances: int) -> dict[str, Any]:
        """`POST /api/v1/scale`: set the instance count of `artifact` in every blueprint with it."""
        return _dict(self.send_json("POST", "/api/v1/scale", {"artifact": artifact, "instances": instances}))

    def undeploy(self, artifact: str) -> dict[str, Any]:
        """`POST /api/v1/undeploy`: remove `artifact` (G:A:V or G:A) from every blueprint."""
        return _dict(self.send_json("POST", "/api/v1/undeploy", {"artifact": artifact}))

    def invoke(
        self, artifact: str, entry: str, argument: object = None, *, timeout: float | None = None
    ) -> Any:
        """`POST /api/v1/invoke/{artifact}/{entry}`: call a slice entry point with the JSON
        `argument`; its JSON answer (ApiError 404 unknown entry, 502 the slice raised, 504 no
        answer within `timeout` seconds, the node's default when None)."""
        path, params = _invoke_path(artifact, entry, timeout)
        body = msgspec.json.encode(argument)
        answer = _run(self._request("POST", path, params, body, "application/json", longer=timeout or 0.0))
        return self._json(self.check(answer))

    def metrics(self) -> dict[str, Any]:
        """`GET /api/v1/metrics`: the cluster's figures (nodes, entry points, totals)."""
        return _dict(self.get_json("/api/v1/metrics"))

    # -- raw calls --------------------------------------------------------------------------------------

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
        timeout = round(self.timeout + size / rate, 1)
        return self.check(_run(self._upload(path, file, size, params, progress, timeout)))

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

    def events(self, read_timeout: float = 45.0, path: str = "/api/v1/events") -> Iterator[ServerEvent]:
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


class AsyncManagementClient(_Base):
    """The asyncio client of one node's management API: the methods of `ManagementClient`, awaited
    (`await client.status()`); `events()` is an async iterator. Arguments and errors as there.
    Each request opens its own connection, so one client serves concurrent tasks."""

    # -- typed calls ----------------------------------------------------------------------------------

    async def status(self) -> NodeStatus:
        """`GET /api/v1/status`: the cluster as this node sees it."""
        return self.decode(await self.get_raw("/api/v1/status"), NodeStatus)

    async def health(self) -> dict[str, Any]:
        """`GET /api/v1/health` (a 503 answer is returned, with ``ready: false`` and a ``reason``)."""
        return self._health(await self.request("GET", "/api/v1/health"))

    async def nodes(self) -> list[dict[str, Any]]:
        """`GET /api/v1/nodes`: ``[{"id", "address", "state", "leader"}]``."""
        return _list(await self.get_json("/api/v1/nodes"))

    async def kv(self, prefix: str = "") -> list[KVEntry]:
        """`GET /api/v1/kv?prefix=P`: the replicated store's keys under `prefix`, with values."""
        return self.decode(await self.get_raw("/api/v1/kv", {"prefix": prefix}), _KVListing).entries

    async def slices(self) -> list[SliceStatus]:
        """`GET /api/v1/slices`: desired and ACTIVE instances per artifact, per-node states."""
        return self.decode(await self.get_raw("/api/v1/slices"), _slice_statuses())

    async def blueprints(self) -> list[dict[str, Any]]:
        """`GET /api/v1/blueprints`: the stored blueprints."""
        return _list(await self.get_json("/api/v1/blueprints"))

    async def apply_blueprint(self, toml: str, filename: str = "blueprint.toml") -> dict[str, Any]:
        """`POST /api/v1/blueprints`: store the blueprint `toml`; the expanded blueprint."""
        return _dict(await self.send_json("POST", "/api/v1/blueprints", {"toml": toml, "filename": filename}))

    async def wait_blueprint(self, blueprint_id: str, timeout: float = 60.0) -> list[SliceStatus]:
        """`POST /api/v1/blueprints/{id}/wait`: the statuses once every instance is ACTIVE."""
        path, params = _wait_path(blueprint_id, timeout)
        answer = await self._request("POST", path, params, None, "application/json", longer=timeout)
        return self.decode(self.check(answer), _slice_statuses())

    async def delete_blueprint(self, blueprint_id: str) -> dict[str, Any]:
        """`DELETE /api/v1/blueprints/{id}`."""
        return _dict(await self.send_json("DELETE", f"/api/v1/blueprints/{_seg(blueprint_id)}"))

    async def deploy(self, artifact: str, instances: int = 1) -> BlueprintValue:
        """`POST /api/v1/deploy`: deploy `artifact` (G:A:V) as the blueprint ``direct:G:A``."""
        body = msgspec.json.encode({"artifact": artifact, "instances": instances})
        return self.decode(await self.request_raw("POST", "/api/v1/deploy", None, body), _blueprint_value())

    async def scale(self, artifact: str, instances: int) -> dict[str, Any]:
        """`POST /api/v1/scale`."""
        return _dict(
            await self.send_json("POST", "/api/v1/scale", {"artifact": artifact, "instances": instances})
        )

    async def undeploy(self, artifact: str) -> dict[str, Any]:
        """`POST /api/v1/undeploy`."""
        return _dict(await self.send_json("POST", "/api/v1/undeploy", {"artifact": artifact}))

    async def invoke(
        self, artifact: str, entry: str, argument: object = None, *, timeout: float | None = None
    ) -> Any:
        """`POST /api/v1/invoke/{artifact}/{entry}`: the entry's JSON answer."""
        path, params = _invoke_path(artifact, entry, timeout)
        body = msgspec.json.encode(argument)
        answer = await self._request("POST", path, params, body, "application/json", longer=timeout or 0.0)
        return self._json(self.check(answer))

    async def metrics(self) -> dict[str, Any]:
        """`GET /api/v1/metrics`."""
        return _dict(await self.get_json("/api/v1/metrics"))

    # -- raw calls --------------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Answer:
        """Send one request; the node's answer, whatever its status (ApiUnreachable if none)."""
        return await self._request(method, path, params, body, content_type)

    async def request_raw(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> bytes:
        """The body of a 2xx answer (ApiError / ApiUnreachable otherwise)."""
        return self.check(await self._request(method, path, params, body, content_type))

    async def get_raw(self, path: str, params: dict[str, str] | None = None) -> bytes:
        """GET `path` and return the body of a 2xx answer."""
        return await self.request_raw("GET", path, params)

    async def get_json(self, path: str, params: dict[str, str] | None = None) -> object:
        """GET `path` and decode its JSON body."""
        return self._json(await self.get_raw(path, params))

    async def send_json(self, method: str, path: str, payload: object | None = None) -> object:
        """POST/PUT/DELETE `payload` as JSON to `path`; the decoded JSON answer (or None)."""
        body = None if payload is None else msgspec.json.encode(payload)
        raw = await self.request_raw(method, path, None, body, "application/json")
        return self._json(raw) if raw.strip() else None

    async def events(
        self, read_timeout: float = 45.0, path: str = "/api/v1/events"
    ) -> AsyncIterator[ServerEvent]:
        """Follow the server-sent events of `path` until the caller stops (StreamLost when the
        open stream ends, fails or stays silent for `read_timeout` seconds)."""
        async for event in self._events(path, read_timeout):
            yield event


# -- helpers of the typed calls ---------------------------------------------------------------------------


class _KVListing(msgspec.Struct, frozen=True):
    prefix: str
    entries: list[KVEntry]


def _slice_statuses() -> Any:
    from aether.deploy.operations import SliceStatus  # imported when used: start-up time

    return list[SliceStatus]


def _blueprint_value() -> Any:
    from aether.kv.keys import BlueprintValue

    return BlueprintValue


def _seg(text: str) -> str:
    """`text` as one path segment (``:`` kept: artifact coordinates and blueprint ids use it)."""
    return quote(text, safe=":@")


def _wait_path(blueprint_id: str, timeout: float) -> tuple[str, dict[str, str]]:
    return f"/api/v1/blueprints/{_seg(blueprint_id)}/wait", {"timeout": f"{timeout:g}"}


def _invoke_path(artifact: str, entry: str, timeout: float | None) -> tuple[str, dict[str, str] | None]:
    params = None if timeout is None else {"timeout": f"{timeout:g}"}
    return f"/api/v1/invoke/{_seg(artifact)}/{_seg(entry)}", params


def _list(doc: object) -> list[dict[str, Any]]:
    return doc if isinstance(doc, list) else []


def _dict(doc: object) -> dict[str, Any]:
    return doc if isinstance(doc, dict) else {}


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
