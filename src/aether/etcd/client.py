"""`EtcdClient`: an asyncio client of etcd v3 over its gRPC-gateway JSON API (aiohttp).

Each operation is one POST to ``{endpoint}/v3/...``. An operation tries the endpoints in turn
(starting with the one that answered last) until one answers or `EtcdConfig.request_timeout`
passes, then raises `StoreUnavailable` naming the endpoints and the last failure. Reads, puts,
deletes, lease calls and `put_once` are retried after a lost answer; `compare_and_set` only when
the request never reached etcd (connection refused), since a lost answer leaves its outcome
unknown (`StoreUnavailable.indeterminate`): use `put_once` for writes that must happen once.

Watches are long-lived POSTs to ``/v3/watch`` whose answer is a stream of JSON lines; `EtcdWatch`
reconnects (to any endpoint) when the stream drops and resumes from the revision after the last
event it delivered (`WatchCursor`, sans-IO), so no event is lost or repeated. When that revision
has been compacted it raises `Compacted`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Final, Literal, TypeVar

import aiohttp
import msgspec

from aether.core.calls import RetryPolicy
from aether.etcd.errors import (
    Compacted,
    EtcdAuthFailed,
    EtcdBadRequest,
    EtcdError,
    LeaseNotFound,
    StoreUnavailable,
)
from aether.etcd.types import (
    CasResult,
    EtcdConfig,
    KeyValue,
    Lease,
    OnceResult,
    RangeResult,
    WatchEvent,
    WireAuth,
    WireDelete,
    WireError,
    WireKeepAlive,
    WireKV,
    WireLease,
    WirePut,
    WireRange,
    WireTxn,
    WireWatch,
    WireWatchLine,
)

__all__ = ["EtcdClient", "EtcdWatch", "LeaseKeeper", "WatchCursor", "prefix_end"]

T = TypeVar("T")

MAX_KEY_BYTES: Final = 4096
"""Longest relative key accepted (UTF-8 bytes); etcd itself allows more, Aether's keys are short."""

_GRPC_UNAVAILABLE: Final = frozenset({4, 14})  # DeadlineExceeded, Unavailable: no leader, timed out...
_GRPC_INVALID_ARGUMENT: Final = 3
_GRPC_NOT_FOUND: Final = 5
_GRPC_PERMISSION_DENIED: Final = 7
_GRPC_OUT_OF_RANGE: Final = 11
_GRPC_UNAUTHENTICATED: Final = 16


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` for all keys starting with `prefix`: the prefix with its last byte
    below 0xff incremented (``\\0`` for an empty prefix: every key)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


def _check_key(key: object, what: str = "key") -> str:
    if not isinstance(key, str):
        raise EtcdBadRequest(f"etcd {what} must be a str, not {type(key).__name__}")
    if not key:
        raise EtcdBadRequest(f"etcd {what} must not be empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise EtcdBadRequest(f"etcd {what} is longer than {MAX_KEY_BYTES} bytes")
    return key


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise EtcdBadRequest(f"etcd prefix must be a str, not {type(prefix).__name__}")
    return prefix


def _check_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        hint = ": encode it (e.g. value.encode())" if isinstance(value, str) else ""
        raise EtcdBadRequest(f"etcd value must be bytes, not {type(value).__name__}{hint}")
    return value


def _check_revision(revision: object, what: str) -> int:
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise EtcdBadRequest(f"etcd {what} must be an int >= 0, not {revision!r}")
    return revision


class WatchCursor:
    """Where a watch stands (sans-IO): the revision to resume from, and which events of an answer
    are new. `next_revision` 0 means "from now": the first ``created`` answer fixes it."""

    def __init__(self, start_revision: int) -> None:
        self.next_revision = start_revision

    def created(self, header_revision: int) -> None:
        """The watch was (re)created; etcd's revision then was `header_revision`."""
        if self.next_revision == 0:
            self.next_revision = header_revision + 1

    def accept(self, events: Sequence[WatchEvent]) -> list[WatchEvent]:
        """The events not delivered yet (revision >= `next_revision`), in order; moves past them."""
        fresh = [e for e in events if e.mod_revision >= self.next_revision]
        if fresh:
            self.next_revision = fresh[-1].mod_revision + 1
        return fresh


class _Lost(Exception):
    """One endpoint failed (internal): `sent` tells whether the request may have reached etcd."""

    def __init__(self, endpoint: str, reason: str, *, sent: bool, code: int | None = None) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.sent = sent
        self.code = code


class _TokenExpired(Exception):
    """etcd refused the auth token (internal): authenticate again and retry."""


class EtcdClient:
    """An asyncio etcd v3 client for one Aether cluster (all keys under ``/aether/{cluster}/``).

    Use it as ``async with EtcdClient(config) as etcd: ...`` (or `open`/`close`). Keys are
    relative strs, values bytes; bad input raises `EtcdBadRequest` before anything is sent.
    `namespace`: where under ``/aether/{cluster}/`` its keys live: ``kv/`` (the store's data) by
    default; the node keeps its member keys under ``members/`` with a second client.
    """

    def __init__(
        self, config: EtcdConfig, *, rng: random.Random | None = None, namespace: str = "kv/"
    ) -> None:
        if not namespace.endswith("/") or namespace.startswith("/") or namespace == "requests/":
            raise ValueError(f"etcd client namespace {namespace!r}: NAME/, not requests/")
        self.config = config
        self._policy = RetryPolicy(
            timeout=config.request_timeout, attempt_timeout=config.attempt_timeout, backoff_max=0.5
        )
        self._rng = rng or random.Random()
        self._root = config.root.encode()
        self._kv_root = self._root + namespace.encode()
        self._req_root = self._root + b"requests/"
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self.authentications = 0
        """How many auth tokens this client obtained (the first, then one per expiry)."""
        self._auth_lock = asyncio.Lock()
        self._ssl: ssl.SSLContext | None = self._ssl_context()

    # -- lifecycle ---------------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        c = self.config
        if c.ca_file is None and c.cert_file is None:
            return None
        ctx = ssl.create_default_context(cafile=c.ca_file)
        if c.cert_file is not None and c.key_file is not None:
            ctx.load_cert_chain(c.cert_file, c.key_file)
        return ctx

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> EtcdClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def endpoint(self) -> str:
        """The endpoint the next request goes to first (the one that answered last)."""
        return self.config.endpoints[self._current]

    def _full(self, key: str) -> bytes:
        return self._kv_root + key.encode()

    def _relative(self, key: bytes) -> str:
        return key[len(self._kv_root) :].decode(errors="replace")

    def _kv(self, w: WireKV) -> KeyValue:
        return KeyValue(self._relative(w.key), w.value, w.create_revision, w.mod_revision, w.version, w.lease)

    # -- one request, retried over the endpoints ----------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _post_once(self, endpoint: str, path: str, body: dict[str, Any], timeout: float) -> bytes:
        """POST to one endpoint; etcd errors raised typed, transport failures as `_Lost`."""
        if self._session is None:
            raise EtcdError("the etcd client is not open: use `async with EtcdClient(...)` or open()")
        try:
            async with self._session.post(
                f"{endpoint}/v3/{path}",
                data=msgspec.json.encode(body),
                headers={"Content-Type": "application/json", **self._headers()},
                ssl=self._ssl or True,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                data = await resp.read()
                status = resp.status
        except aiohttp.ClientSSLError as e:
            raise _Lost(endpoint, f"TLS failed ({e}): check the etcd ca/cert/key files", sent=False) from e
        except aiohttp.ClientConnectorError as e:
            raise _Lost(endpoint, f"cannot connect ({e.os_error or e})", sent=False) from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise _Lost(endpoint, f"no answer ({type(e).__name__}: {e})", sent=True) from e
        if status == 200:
            return data
        self._raise_answer(endpoint, status, data)
        raise AssertionError("unreachable")

    def _raise_answer(self, endpoint: str, status: int, data: bytes) -> None:
        try:
            err = msgspec.json.decode(data, type=WireError, strict=False)
        except msgspec.DecodeError:
            err = WireError()
        if not err.code and not err.error:
            raise EtcdError(
                f"etcd endpoint {endpoint} answered HTTP {status} without an etcd error "
                f"({data[:100]!r}): is it an etcd >= 3.4 client URL (the /v3 gateway)?",
                endpoint=endpoint,
            )
        self._raise_error(endpoint, err)

    def _raise_error(self, endpoint: str, err: WireError) -> None:
        text = err.message or err.error
        code = err.code
        if code in _GRPC_UNAVAILABLE:
            raise _Lost(endpoint, text, sent=True, code=code)
        if code == _GRPC_UNAUTHENTICATED or "invalid auth token" in text:
            raise _TokenExpired(text)
        if "user name is empty" in text:
            raise EtcdAuthFailed(
                f"etcd at {endpoint} requires authentication ({text}): configure etcd username and password",
                endpoint=endpoint,
                code=code,
            )
        if "authentication failed" in text:
            raise EtcdAuthFailed(
                f"etcd at {endpoint} refused the credentials ({text}): check the etcd username/password",
                endpoint=endpoint,
                code=code,
            )
        if code == _GRPC_PERMISSION_DENIED:
            raise EtcdAuthFailed(
                f"etcd at {endpoint} denied the request ({text}): the etcd user needs read-write on "
                f"the prefix {self.config.root}",
                endpoint=endpoint,
                code=code,
            )
        if code == _GRPC_OUT_OF_RANGE and "compacted" in text:
            raise Compacted(0, endpoint=endpoint)
        if code in (_GRPC_INVALID_ARGUMENT, _GRPC_OUT_OF_RANGE):
            raise EtcdBadRequest(
                f"etcd at {endpoint} refused the request: {text}", endpoint=endpoint, code=code
            )
        raise EtcdError(
            f"etcd at {endpoint} failed the request: {text} (gRPC code {code})", endpoint=endpoint, code=code
        )

    async def _call(self, path: str, body: dict[str, Any], type_: type[T], *, retry_sent: bool = True) -> T:
        """POST `body` to ``/v3/{path}``, failing over between endpoints until the deadline;
        decode the answer as `type_`. `retry_sent`: retry after a lost answer (idempotent calls)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._policy.timeout
        n = len(self.config.endpoints)
        tried = 0
        last: _Lost | None = None
        reauthed = False
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            endpoint = self.config.endpoints[self._current]
            try:
                if self.config.username is not None and self._token is None:
                    await self._authenticate(endpoint, remaining)
                data = await self._post_once(endpoint, path, body, self._policy.attempt_wait(remaining))
                return msgspec.json.decode(data, type=type_, strict=False)
            except _TokenExpired as e:
                if self.config.username is None:
                    raise EtcdAuthFailed(
                        f"etcd at {endpoint} requires authentication ({e}): configure an etcd username "
                        "and password",
                        endpoint=endpoint,
                    ) from None
                if reauthed:
                    raise EtcdAuthFailed(
                        f"etcd at {endpoint} refused a fresh auth token ({e})", endpoint=endpoint
                    ) from None
                self._token = None
                reauthed = True
                continue
            except _Lost as e:
                last = e
                if e.sent and not retry_sent:
                    raise StoreUnavailable(
                        f"etcd at {endpoint} did not answer a write ({e.reason}); it may or may not have "
                        "been applied: read the key to find out",
                        endpoint=endpoint,
                        code=e.code,
                        indeterminate=True,
                    ) from None
                self._current = (self._current + 1) % n
                tried += 1
                if tried % n == 0:
                    pause = self._policy.backoff(tried // n - 1, self._rng)
                    await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
        raise StoreUnavailable(
            f"etcd unreachable: no answer from {', '.join(self.config.endpoints)} within "
            f"{self._policy.timeout:g}s (last: {last}); check that etcd is running and has a quorum",
            endpoint=last.endpoint if last else None,
            code=last.code if last else None,
        )

    async def _authenticate(self, endpoint: str, remaining: float) -> None:
        async with self._auth_lock:
            if self._token is not None:
                return
            body = {"name": self.config.username, "password": self.config.password}
            data = await self._post_once(
                endpoint, "auth/authenticate", body, self._policy.attempt_wait(remaining)
            )
            self._token = msgspec.json.decode(data, type=WireAuth, strict=False).token
            self.authentications += 1

    # -- keys ---------------------------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        """The key's current value and revisions, or None when it does not exist."""
        full = self._full(_check_key(key))
        r = await self._call("kv/range", {"key": _b64(full)}, WireRange)
        return self._kv(r.kvs[0]) if r.kvs else None

    async def range(self, prefix: str = "") -> RangeResult:
        """Every key starting with `prefix` (all of the cluster's keys for ""), sorted by key, with
        the store revision they were read at."""
        full = self._full(_check_prefix(prefix))
        r = await self._call("kv/range", {"key": _b64(full), "range_end": _b64(prefix_end(full))}, WireRange)
        return RangeResult([self._kv(kv) for kv in r.kvs], r.header.revision)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write `value` (attached to `lease` when not 0); returns the revision of the write."""
        body: dict[str, Any] = {"key": _b64(self._full(_check_key(key))), "value": _b64(_check_value(value))}
        if _check_revision(lease, "lease"):
            body["lease"] = str(lease)
        r = await self._call("kv/put", body, WirePut)
        return r.header.revision

    async def delete(self, key: str) -> bool:
        """Delete the key; True when it existed."""
        r = await self._call("kv/deleterange", {"key": _b64(self._full(_check_key(key)))}, WireDelete)
        return r.deleted > 0

    def _put_op(self, key: bytes, value: bytes, lease: int) -> dict[str, Any]:
        op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            op["lease"] = str(lease)
        return {"request_put": op}

    async def compare_and_set(
        self, key: str, expected_mod_revision: int, value: bytes, *, lease: int = 0
    ) -> CasResult:
        """Write `value` only if the key's mod_revision is `expected_mod_revision` (0: only if the
        key does not exist), in one etcd transaction. On failure `current` is the key as it is."""
        full = self._full(_check_key(key))
        expected = _check_revision(expected_mod_revision, "expected_mod_revision")
        _check_value(value)
        _check_revision(lease, "lease")
        body = {
            "compare": [
                {"target": "MOD", "result": "EQUAL", "key": _b64(full), "mod_revision": str(expected)}
            ],
            "success": [self._put_op(full, value, lease)],
            "failure": [{"request_range": {"key": _b64(full)}}],
        }
        r = await self._call("kv/txn", body, WireTxn, retry_sent=False)
        if r.succeeded:
            return CasResult(True, r.header.revision)
        rng = r.responses[0].response_range if r.responses else None
        current = self._kv(rng.kvs[0]) if rng is not None and rng.kvs else None
        return CasResult(False, r.header.revision, current)

    async def put_once(
        self,
        request_id: str,
        key: str,
        value: bytes,
        *,
        expected_mod_revision: int | None = None,
        lease: int = 0,
        record_lease: int = 0,
    ) -> OnceResult:
        """Write `value` at most once per `request_id`, so a caller may retry after a lost answer
        (another endpoint, another client) without writing twice.

        One transaction writes the key and the record ``/aether/{cluster}/requests/{request_id}``
        if that record does not exist (and, when `expected_mod_revision` is given, the key's
        mod_revision matches, as in `compare_and_set`). The record is attached to `record_lease`
        when not 0, so old records expire."""
        rid = self._req_root + _check_key(request_id, "request id").encode()
        full = self._full(_check_key(key))
        _check_value(value)
        _check_revision(lease, "lease")
        _check_revision(record_lease, "record_lease")
        compare = [{"target": "CREATE", "result": "EQUAL", "key": _b64(rid), "create_revision": "0"}]
        if expected_mod_revision is not None:
            expected = _check_revision(expected_mod_revision, "expected_mod_revision")
            compare.append(
                {"target": "MOD", "result": "EQUAL", "key": _b64(full), "mod_revision": str(expected)}
            )
        return await self._once_txn(compare, self._put_op(full, value, lease), full, rid, record_lease)

    async def write_once(
        self,
        request_id: str,
        key: str,
        value: bytes | None,
        *,
        expect: Literal["any", "absent", "exists", "value"] = "any",
        expected_value: bytes = b"",
        record_lease: int = 0,
    ) -> OnceResult:
        """Put `value` (None: delete the key) at most once per `request_id`, under a condition on the
        key: ``any``, ``absent`` (it must not exist), ``exists``, or ``value`` (it must hold
        `expected_value`: a transaction comparing the value itself). Like `put_once`: the key and
        the record ``/aether/{cluster}/requests/{request_id}`` are written in one transaction, so a
        retry after a lost answer (retried here, on any endpoint) answers ``duplicate`` with the
        revision of the first write instead of writing again. ``conflict``: the condition failed,
        nothing was written, `current` is the key as it is (None: absent)."""
        rid = self._req_root + _check_key(request_id, "request id").encode()
        full = self._full(_check_key(key))
        if value is not None:
            _check_value(value)
        _check_value(expected_value)
        _check_revision(record_lease, "record_lease")
        compare: list[dict[str, Any]] = [
            {"target": "CREATE", "result": "EQUAL", "key": _b64(rid), "create_revision": "0"}
        ]
        if expect == "absent":
            compare.append({"target": "CREATE", "result": "EQUAL", "key": _b64(full), "create_revision": "0"})
        elif expect == "exists":
            compare.append(
                {"target": "CREATE", "result": "GREATER", "key": _b64(full), "create_revision": "0"}
            )
        elif expect == "value":  # etcd fails a VALUE compare on a missing key: absent never matches
            compare.append(
                {"target": "VALUE", "result": "EQUAL", "key": _b64(full), "value": _b64(expected_value)}
            )
        elif expect != "any":
            raise EtcdBadRequest(f"etcd write condition must be any, absent, exists or value, not {expect!r}")
        write = (
            {"request_delete_range": {"key": _b64(full)}} if value is None else self._put_op(full, value, 0)
        )
        return await self._once_txn(compare, write, full, rid, record_lease)

    async def _once_txn(
        self, compare: list[dict[str, Any]], write: dict[str, Any], full: bytes, rid: bytes, record_lease: int
    ) -> OnceResult:
        """The txn of `put_once`/`write_once`: if `compare` holds, `write` and the request-id record
        `rid` (naming `full`) together; else read the record (a duplicate) and the key (a conflict)."""
        body = {
            "compare": compare,
            "success": [write, self._put_op(rid, full, record_lease)],
            "failure": [{"request_range": {"key": _b64(rid)}}, {"request_range": {"key": _b64(full)}}],
        }
        r = await self._call("kv/txn", body, WireTxn)
        if r.succeeded:
            return OnceResult("applied", r.header.revision)
        record = r.responses[0].response_range if r.responses else None
        if record is not None and record.kvs:
            return OnceResult("duplicate", record.kvs[0].mod_revision)
        cur = r.responses[1].response_range if len(r.responses) > 1 else None
        return OnceResult("conflict", r.header.revision, self._kv(cur.kvs[0]) if cur and cur.kvs else None)

    async def compact(self, revision: int) -> None:
        """Discard the history before `revision` (watches from older revisions then get `Compacted`)."""
        body = {"revision": str(_check_revision(revision, "revision")), "physical": True}
        await self._call("kv/compaction", body, WirePut)

    # -- leases -------------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> Lease:
        """A new lease of `ttl` seconds (keep it alive with `keepalive` or a `LeaseKeeper`)."""
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1:
            raise EtcdBadRequest(f"etcd lease ttl must be an int >= 1 (seconds), not {ttl!r}")
        r = await self._call("lease/grant", {"TTL": str(ttl)}, WireLease)
        return Lease(r.ID, r.TTL)

    async def keepalive(self, lease_id: int) -> int:
        """Renew the lease once; returns its new TTL. Raises `LeaseNotFound` when it has expired."""
        r = await self._call(
            "lease/keepalive", {"ID": str(_check_revision(lease_id, "lease id"))}, WireKeepAlive
        )
        if r.error is not None:
            self._raise_error(self.endpoint, r.error)
        if r.result is None or r.result.TTL <= 0:
            raise LeaseNotFound(lease_id, endpoint=self.endpoint)
        return r.result.TTL

    async def revoke(self, lease_id: int) -> None:
        """Revoke the lease now (its keys are deleted). A lease already gone is not an error."""
        try:
            await self._call("lease/revoke", {"ID": str(_check_revision(lease_id, "lease id"))}, WireLease)
        except EtcdError as e:
            if e.code != _GRPC_NOT_FOUND:
                raise

    def keep_alive(self, lease: Lease, *, interval: float | None = None) -> LeaseKeeper:
        """Start renewing `lease` in the background (every ttl/3 seconds unless `interval`)."""
        keeper = LeaseKeeper(self, lease, interval if interval is not None else max(0.1, lease.ttl / 3))
        keeper.start()
        return keeper

    # -- watches ------------------------------------------------------------------------------------

    def watch(self, prefix: str = "", start_revision: int = 0) -> EtcdWatch:
        """The changes of the keys under `prefix` from `start_revision` on (0: from now), as an async
        iterator of `WatchEvent` in revision order. Reconnects and resumes by itself; raises
        `Compacted` when the revision to resume from is compacted, `StoreUnavailable` when no
        endpoint answers for `request_timeout`. Close it with ``await watch.aclose()``."""
        full = self._full(_check_prefix(prefix))
        return EtcdWatch(self, full, _check_revision(start_revision, "start_revision"))

    async def _watch_stream(
        self, endpoint: str, key: bytes, cursor: WatchCursor
    ) -> AsyncGenerator[WireWatch, None]:
        if self._session is None:
            raise EtcdError("the etcd client is not open: use `async with EtcdClient(...)` or open()")
        create: dict[str, Any] = {"key": _b64(key), "range_end": _b64(prefix_end(key))}
        if cursor.next_revision:
            create["start_revision"] = str(cursor.next_revision)
        try:
            async with self._session.post(
                f"{endpoint}/v3/watch",
                data=msgspec.json.encode({"create_request": create}),
                headers={"Content-Type": "application/json", **self._headers()},
                ssl=self._ssl or True,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.attempt_timeout),
            ) as resp:
                if resp.status != 200:
                    self._raise_answer(endpoint, resp.status, await resp.read())
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        if not line.strip():
                            continue
                        msg = msgspec.json.decode(line, type=WireWatchLine, strict=False)
                        if msg.error is not None:
                            self._raise_error(endpoint, msg.error)
                        if msg.result is not None:
                            yield msg.result
        except aiohttp.ClientSSLError as e:
            raise _Lost(endpoint, f"TLS failed ({e}): check the etcd ca/cert/key files", sent=False) from e
        except aiohttp.ClientConnectorError as e:
            raise _Lost(endpoint, f"cannot connect ({e.os_error or e})", sent=False) from e
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise _Lost(endpoint, f"watch stream broke ({type(e).__name__}: {e})", sent=True) from e
        raise _Lost(endpoint, "watch stream ended", sent=True)


class EtcdWatch:
    """An async iterator of the `WatchEvent`s under one prefix; see `EtcdClient.watch`.

    `endpoint` is the endpoint it is connected to (None between connections), `next_revision` the
    revision it resumes from, `reconnects` how many times it reconnected."""

    def __init__(self, client: EtcdClient, key: bytes, start_revision: int) -> None:
        self._client = client
        self._key = key
        self.cursor = WatchCursor(start_revision)
        self.endpoint: str | None = None
        self.reconnects = 0
        self.created = asyncio.Event()
        self._gen = self._events()

    @property
    def next_revision(self) -> int:
        return self.cursor.next_revision

    def __aiter__(self) -> EtcdWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> EtcdWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _events(self) -> AsyncGenerator[WatchEvent, None]:
        client = self._client
        loop = asyncio.get_running_loop()
        policy = client._policy
        n = len(client.config.endpoints)
        failing_since: float | None = None
        failures = expired = 0
        last: _Lost | None = None
        while True:
            endpoint = client.config.endpoints[client._current]
            try:
                if client.config.username is not None and client._token is None:
                    await client._authenticate(endpoint, policy.timeout)
                stream = client._watch_stream(endpoint, self._key, self.cursor)
                try:
                    async for result in stream:
                        if result.compact_revision:
                            raise Compacted(
                                result.compact_revision,
                                endpoint=endpoint,
                                requested=self.cursor.next_revision,
                            )
                        if result.canceled:
                            raise EtcdError(
                                f"etcd at {endpoint} cancelled the watch: {result.cancel_reason or '?'}",
                                endpoint=endpoint,
                            )
                        if result.created:
                            self.cursor.created(result.header.revision)
                            self.endpoint = endpoint
                            self.created.set()
                            failing_since, failures, expired = None, 0, 0
                        events = [
                            WatchEvent(
                                "delete" if ev.type == "DELETE" else "put",
                                client._relative(ev.kv.key),
                                ev.kv.value,
                                ev.kv.mod_revision,
                                ev.kv.create_revision,
                            )
                            for ev in result.events
                        ]
                        for event in self.cursor.accept(events):
                            yield event
                finally:
                    with contextlib.suppress(Exception):
                        await stream.aclose()
            except _TokenExpired as e:
                client._token = None
                expired += 1
                if client.config.username is None or expired > 1:
                    raise EtcdAuthFailed(
                        f"etcd at {endpoint} refused the watch's auth token ({e}): configure etcd username "
                        "and password (or check them)",
                        endpoint=endpoint,
                    ) from None
                continue
            except _Lost as e:
                last = e
            self.endpoint = None
            self.reconnects += 1
            now = loop.time()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since > policy.timeout:
                raise StoreUnavailable(
                    f"etcd unreachable: the watch could not reconnect to {', '.join(client.config.endpoints)}"
                    f" within {policy.timeout:g}s (last: {last}); resume from revision "
                    f"{self.cursor.next_revision} when etcd is back",
                    endpoint=last.endpoint if last else None,
                )
            client._current = (client._current + 1) % n
            failures += 1
            if failures % n == 0:
                await asyncio.sleep(policy.backoff(failures // n - 1, client._rng))


class LeaseKeeper:
    """Renews a lease in the background until `stop`. When the lease is lost (expired: the renewals
    did not get through in time, or revoked) `lost` is set and `error` says why; renewals that fail
    because etcd is unreachable are retried until the lease's TTL has passed."""

    def __init__(self, client: EtcdClient, lease: Lease, interval: float) -> None:
        self.client = client
        self.lease = lease
        self.interval = interval
        self.lost = asyncio.Event()
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"etcd-lease-{self.lease.id:x}"
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.client.keepalive(self.lease.id)
                renewed = loop.time()
            except LeaseNotFound as e:
                self.error = e
                self.lost.set()
                return
            except EtcdError as e:
                if loop.time() - renewed > self.lease.ttl:
                    self.error = e
                    self.lost.set()
                    return

    async def stop(self, *, revoke: bool = False) -> None:
        """Stop renewing; with `revoke`, revoke the lease too (its keys go at once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if revoke:
            await self.client.revoke(self.lease.id)
