"""A small synchronous client for a node's management API, used by the CLI.

A minimal HTTP/1.1 client on a plain socket (one request per connection, `Connection: close`),
so that CLI start-up stays fast (no event loop, no aiohttp, not even `http.client`, which pulls
in `ssl` and `email`) and proxy environment variables never apply to talking to a node.

HTTPS (``https://HOST:PORT``): the socket is wrapped with TLS 1.2+, the node's certificate
verified against the system trust store and the CA file given (`--ca` / AETHER_CA), and the host
name or IP address checked against it; `ssl` is imported only then. `client_for` also finds a
local cluster started with `aether cluster start --tls` that has a node at the address, and uses
HTTPS and that cluster's CA for it (docs/cluster-security.md, *HTTPS*).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import msgspec

from aether.core.errors import AetherError, ConfigError
from aether.core.problem import decode_problem
from aether.core.types import Address

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

    def __init__(self, address: str, status: int, title: str, detail: str) -> None:
        super().__init__(f"{address} answered {status} {title}: {detail}")
        self.address = address
        self.status = status
        self.title = title
        self.detail = detail


class _NoAnswer(TimeoutError):
    """Connected and sent, but the answer did not arrive in time."""


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
        self._tls: Any = None  # the ssl.SSLContext, made on first use

    @property
    def target(self) -> str:
        """The node as a `--connect` value: ``HOST:PORT``, or ``https://HOST:PORT``."""
        return f"https://{self.address}" if self.https else str(self.address)

    def _tls_context(self) -> Any:
        if self._tls is None:
            import ssl

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

    def _tls_error(self, e: OSError) -> ApiTlsError | None:
        """The ApiTlsError for an `ssl` exception of a request (None for another error)."""
        import ssl

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
        if isinstance(e, ssl.SSLError):
            reason = e.reason or str(e)
            if reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL",
                          "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST"):
                return ApiTlsError(
                    addr, f"the Aether node at {addr} does not speak HTTPS ({reason})",
                    f"It serves plain HTTP: connect with --connect http://{self.address}.",
                )
            return ApiTlsError(addr, f"TLS handshake with the Aether node at {addr} failed: {reason}",
                               "Check the node's --http-tls-cert and the --ca you pass.")
        return None

    def unreachable(self, e: ConfigError | OSError) -> ApiUnreachable:
        """The ApiUnreachable (ApiNoAnswer, ApiTlsError) for an exception of a request."""
        addr = self.target
        if isinstance(e, ConfigError):  # the CA file
            return ApiTlsError(addr, str(e), "Pass a PEM CA certificate with --ca FILE (or AETHER_CA).")
        if isinstance(e, ConnectionRefusedError):
            return ApiUnreachable(addr, "connection refused")
        if isinstance(e, _NoAnswer):
            return ApiNoAnswer(addr, self.timeout)
        if isinstance(e, TimeoutError):
            return ApiUnreachable(addr, f"no connection within {self.timeout:g} s")
        if isinstance(e, socket.gaierror):
            return ApiUnreachable(addr, f"cannot resolve host: {e.strerror or e}")
        tls = self._tls_error(e) if self.https else None
        if tls is not None:
            return tls
        why = e.strerror or str(e) or type(e).__name__
        if not self.https and "without an answer" in why:  # what a node serving HTTPS does
            return ApiTlsError(
                addr, f"the Aether node at {addr} closed the connection without an answer: it may "
                "serve HTTPS", f"Connect with --connect https://{self.address} (and --ca FILE).",
            )
        return ApiUnreachable(addr, why)

    def open_socket(self) -> socket.socket:
        """A new connection to the node (TLS-wrapped over HTTPS, handshake done) with the
        client's timeout. Raises what `unreachable` turns into an ApiUnreachable."""
        host = self.address.host.strip("[]")
        raw = socket.create_connection((host, self.address.port), timeout=self.timeout)
        if not self.https:
            return raw
        try:
            tls: socket.socket = self._tls_context().wrap_socket(raw, server_hostname=host)
            return tls
        except BaseException:
            raw.close()
            raise

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
            raise ApiError(self.target, 200, "Bad response", "the answer is not JSON") from None

    def request_raw(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> bytes:
        """Send one request and return the body of a 2xx answer (ApiError / ApiUnreachable otherwise)."""
        addr = self.target
        try:
            status, reason, body = self._request(
                method, path + ("?" + urlencode(params) if params else ""), body, content_type
            )
        except (ConfigError, OSError) as e:
            raise self.unreachable(e) from None
        if status >= 400:
            p = decode_problem(body, status, reason)
            raise ApiError(addr, status, p.title, p.detail)
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
        with self.open_socket() as sock:
            return _parse_response(self._exchange(sock, request, deadline))

    @staticmethod
    def _exchange(sock: socket.socket, request: bytes, deadline: float) -> bytes:
        """Send `request` and read until the node closes the connection (or the deadline)."""
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
        return b"".join(chunks)

    def get_json(self, path: str, params: dict[str, str] | None = None) -> object:
        """GET `path` and decode its JSON body."""
        body = self.get_raw(path, params)
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise ApiError(self.target, 200, "Bad response", "the answer is not JSON") from None

    def get_typed(self, path: str, into: type[_T], params: dict[str, str] | None = None) -> _T:
        """GET `path` and decode its JSON body into `into` (a msgspec-compatible type)."""
        body = self.get_raw(path, params)
        try:
            return msgspec.json.decode(body, type=into)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ApiError(self.target, 200, "Bad response", f"unexpected answer: {e}") from None
