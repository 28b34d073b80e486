"""Who may do what on the management API: roles, the route -> role table, and API keys.

Roles, each including the ones before it:

- `read`: every `GET`/`HEAD` (status, kv, health, nodes, events, metrics, slices, blueprints,
  maps, openapi), except the key list and the audit log;
- `operate`: writes to deployments and data: deploy, scale, undeploy, blueprints, maps, invoke,
  the controller configuration;
- `admin`: keys, the audit log, and every write not named above (membership, secrets and any
  route added later: a new write route is admin-only unless its declaration says otherwise).

Each route declares the role it needs where it is declared (`aether.api.routing.Route.role`, in
the routes modules); `required_role` looks a request's method and path up in those declarations
(`declared_routes()`: every route of every routes module, whether this node serves it or not), the one
place the middleware asks.

Keys. The node's configured key (`--api-key-file`, `AETHER_API_KEY`, `api_key`) is the
*bootstrap* key, role admin, compared in constant time. Further keys are created by an admin
(`POST /api/v1/keys`, `aether key create NAME --role R`) and stored in the replicated store
under `auth/keys/NAME` as `ApiKeyValue` (role, salt, scrypt hash): every node sees them, none
holds the secret. A key reads `NAME.SECRET` (SECRET: 32 random bytes, URL-safe base64); the
name selects the record, so checking a key costs one hash, not one per stored key.

Why scrypt (stdlib `hashlib.scrypt`, n=2**14, r=8, p=1: 16 MiB, about 40 ms here): the store's
journal and snapshots are copied to every node and may end up in backups; a leaked hash must
not give the key. The secrets are 256-bit random, so any one-way hash would already resist
guessing; scrypt is the memory-hard standard function in the stdlib (PBKDF2 is not memory-hard)
and costs nothing per request here: a verified key is remembered (by SHA-256 of the presented
key, bound to the stored hash, so a revoked or re-created key is checked again at once). Hashing
runs in a worker thread, one at a time, so a flood of wrong keys for a known name costs at most
one core and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from typing import Any, Protocol

from aether.api.routing import ROLES, Principal, RoleTable, Route
from aether.core.errors import BadRequest, StatusError, Unauthorized
from aether.kv.keys import ApiKeyKey, ApiKeyValue, check_api_key_name

__all__ = [
    "ANONYMOUS",
    "BOOTSTRAP",
    "ROLES",
    "KeyRing",
    "KeyStore",
    "Principal",
    "check_role",
    "declared_routes",
    "required_role",
]

BOOTSTRAP = "bootstrap"  # the name of the node's configured key (reserved)
ANONYMOUS = "anonymous"  # the caller when the node has no key at all (loopback only): admin
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024
_CACHE_SIZE = 1024



def declared_routes() -> tuple[Route, ...]:
    """Every route of every routes module (served by this node or not)."""
    from aether.api import (
        controller_routes,
        deploy_routes,
        fault_routes,
        log_routes,
        map_routes,
        metrics_routes,
        node_routes,
        repository_routes,
    )

    return (
        *node_routes.ROUTES, *deploy_routes.ROUTES, *map_routes.ROUTES, *metrics_routes.ROUTES,
        *repository_routes.ROUTES, *controller_routes.ROUTES, *fault_routes.ROUTES, *log_routes.ROUTES,
    )


@functools.cache
def _table() -> RoleTable:
    return RoleTable(declared_routes())


def required_role(method: str, path: str) -> str:
    """The role a request with `method` on `path` needs (`RoleTable`: the route's declared role; an
    undeclared write is admin-only)."""
    return _table().role(method, path)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    return role


class KeyStore(Protocol):
    """The node's `KVStore`, as far as keys need it."""

    def get_local(self, key: Any) -> Any: ...

    def list_local(self, prefix: str = "") -> list[tuple[str, Any]]: ...

    async def compare_and_set(self, key: Any, expected: Any, new: Any, timeout: float = 5.0) -> bool: ...

    async def remove(self, key: Any, timeout: float = 5.0) -> bool: ...


def hash_secret(secret: str, salt: bytes, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    return hashlib.scrypt(secret.encode("ascii"), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


class Conflict(StatusError):
    status = 409


class NotFound(StatusError):
    status = 404


class KeyRing:
    """Checks presented keys (bootstrap, then `auth/keys/NAME` records) and manages the records."""

    def __init__(self, bootstrap: str | None, kv: KeyStore | None) -> None:
        self.bootstrap = bootstrap or None
        self.kv = kv
        self._verified: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()
        self._hashing = asyncio.Semaphore(1)

    @property
    def enabled(self) -> bool:
        """False when the node has no key: every caller is `anonymous` with role admin."""
        return self.bootstrap is not None

    async def authenticate(self, presented: str | None) -> Principal:
        """The principal of a presented key (already checked to be printable ASCII), or
        `Unauthorized` naming the problem (never which part of a key was wrong)."""
        if not self.enabled:
            return Principal(ANONYMOUS, "admin")
        if presented is None:
            raise Unauthorized(
                "missing API key: send it as 'X-API-Key: KEY' or 'Authorization: Bearer KEY'"
            )
        assert self.bootstrap is not None
        if hmac.compare_digest(presented.encode(), self.bootstrap.encode()):
            return Principal(BOOTSTRAP, "admin")
        name, dot, secret = presented.partition(".")
        record = self._record(name) if dot and secret and self.kv is not None else None
        if record is None:
            raise Unauthorized("wrong, unknown or revoked API key")
        digest = hashlib.sha256(presented.encode()).digest()
        if self._verified.get(digest) == (name, record.hash):
            self._verified.move_to_end(digest)
            return Principal(name, record.role)
        async with self._hashing:
            computed = await asyncio.to_thread(hash_secret, secret, record.salt, record.n, record.r, record.p)
        if not hmac.compare_digest(computed, record.hash):
            raise Unauthorized("wrong, unknown or revoked API key")
        self._verified[digest] = (name, record.hash)
        if len(self._verified) > _CACHE_SIZE:
            self._verified.popitem(last=False)
        return Principal(name, record.role)

    def _record(self, name: str) -> ApiKeyValue | None:
        try:
            check_api_key_name(name)
        except BadRequest:
            return None
        assert self.kv is not None
        value = self.kv.get_local(ApiKeyKey(name))
        return value if isinstance(value, ApiKeyValue) else None

    def _store(self) -> KeyStore:
        if self.kv is None:
            raise BadRequest("this node has no replicated store: keys cannot be managed here")
        return self.kv

    async def create(self, name: str, role: str) -> tuple[ApiKeyValue, str]:
        """Store a new key NAME with ROLE; returns its record and the key (shown once)."""
        check_api_key_name(name)
        check_role(role)
        if name in (BOOTSTRAP, ANONYMOUS):
            raise BadRequest(f"the key name {name!r} is reserved")
        kv = self._store()
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        async with self._hashing:
            digest = await asyncio.to_thread(hash_secret, secret, salt)
        value = ApiKeyValue(role, salt, digest, SCRYPT_N, SCRYPT_R, SCRYPT_P, time.time())
        if not await kv.compare_and_set(ApiKeyKey(name), None, value):
            raise Conflict(f"a key named {name!r} exists: revoke it first (`aether key revoke {name}`)")
        return value, f"{name}.{secret}"

    def list(self) -> list[dict[str, Any]]:
        kv = self._store()
        out = []
        for key, value in kv.list_local(ApiKeyKey.prefix):
            if isinstance(value, ApiKeyValue):
                name = key[len(ApiKeyKey.prefix) :]
                out.append({"name": name, "role": value.role, "created": value.created})
        return sorted(out, key=lambda d: d["name"])

    async def revoke(self, name: str) -> None:
        check_api_key_name(name)
        if not await self._store().remove(ApiKeyKey(name)):
            raise NotFound(f"no key named {name!r}; `aether key list` shows them")
