"""The node's own management API endpoints: status, kv, health, the probes, nodes, keys, secrets,
audit, events and the OpenAPI document (thin handlers over the `NodeView`, the key ring and the audit log).

Like every routes module it declares its routes once, at the end (`ROUTES`); the server registers
them and documents them from that list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Final, Protocol

import msgspec
from aiohttp import web

from aether.api import sse
from aether.api.audit import AuditEntry, AuditLog
from aether.api.common import API_PREFIX, json_response, query, read_body, resolve
from aether.api.routing import PRINCIPAL, ROLES, Answer, Body, Route, path_param, query_param
from aether.api.types import Health, KeyInfo, KeyRevoked, KVListing, Live, NewKey, NodeEntry, Unready
from aether.core.errors import BadRequest, NotReady, QuorumLost
from aether.core.problem import PROBLEM_CONTENT_TYPE
from aether.core.secrets import REDACTED
from aether.core.status import KVEntry, NodeStatus
from aether.deploy.config import SecretInfo, Secrets
from aether.kv.keys import API_KEY_NAME, SECRET_NAME

__all__ = ["AUTH_PREFIX", "ROUTES", "CreateKey", "NodeRoutes"]

AUTH_PREFIX: Final = "auth/"  # store keys only admins may list (hashes of API keys)
SECRETS_PREFIX: Final = "secrets/"  # store keys whose values nobody may read through the API


class SetSecret(msgspec.Struct, forbid_unknown_fields=True):
    value: Annotated[str, msgspec.Meta(min_length=1, extra_json_schema={"writeOnly": True})]


class SecretDeleted(msgspec.Struct, frozen=True):
    name: str
    deleted: bool


class CreateKey(msgspec.Struct, forbid_unknown_fields=True):
    # documented constraints only (`extra_json_schema`): the key ring checks both and says why
    name: Annotated[str, msgspec.Meta(extra_json_schema={"pattern": f"^{API_KEY_NAME.pattern}$"})]
    role: Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(ROLES)})]


class AddNode(msgspec.Struct, forbid_unknown_fields=True):
    id: Annotated[str, msgspec.Meta(description="the new member's node id")]
    address: Annotated[str, msgspec.Meta(description="its cluster HOST:PORT")]


class MemberAddress(msgspec.Struct, frozen=True):
    id: str
    address: str


class MemberSet(msgspec.Struct, frozen=True):
    """The member set this node follows (`GET /api/v1/cluster/members`)."""

    epoch: int
    members: list[MemberAddress]
    pending: list[MemberAddress] | None = None


class MemberChanged(msgspec.Struct, frozen=True):
    """A committed member change: the new set and the first slot it governs."""

    epoch: int
    members: list[str]
    from_slot: int


class Keys(Protocol):
    """The server's `aether.api.auth.KeyRing`, as far as the key endpoints need it."""

    @property
    def kv(self) -> object | None: ...

    def list(self) -> list[dict[str, Any]]: ...

    async def create(self, name: str, role: str) -> tuple[Any, str]: ...

    async def revoke(self, name: str) -> None: ...


class NodeRoutes:
    def __init__(
        self,
        node: Any,
        *,
        keys: Keys,
        audit: AuditLog,
        log: Any,
        heartbeat: float,
        hub: Any,
        document: Callable[[], dict[str, Any]],
    ) -> None:
        self.node = node
        self.keys = keys
        self.audit = audit
        self.log = log
        self.heartbeat = heartbeat
        self.hub = hub  # the EventHub, None when the node has no bus or store
        self.document = document
        self.secrets = Secrets(keys.kv) if keys.kv is not None else None

    async def status(self, request: web.Request) -> web.Response:
        query(request, ())
        status: Any = await resolve(self.node.status())
        return json_response(status)

    async def kv(self, request: web.Request) -> web.Response:
        prefix = query(request, ("prefix",)).get("prefix", "")
        entries: list[KVEntry] = list(await resolve(self.node.kv_list(prefix)))
        principal = request.get(PRINCIPAL)
        if principal is None or not principal.allows("admin"):  # key hashes: admins only
            entries = [e for e in entries if not e.key.startswith(AUTH_PREFIX)]
        entries = [_redacted(e) if e.key.startswith(SECRETS_PREFIX) else e for e in entries]  # nobody
        entries.sort(key=lambda e: e.key)
        return json_response(KVListing(prefix=prefix, entries=entries))

    async def health(self, request: web.Request) -> web.Response:
        query(request, ())
        return await self._readiness(serving=False)

    async def readyz(self, request: web.Request) -> web.Response:
        """`/readyz`: `health`, and the node must also serve (its HTTP router runs, its journal and
        store writes work). Public: no API key needed."""
        query(request, ())
        return await self._readiness(serving=True)

    async def livez(self, request: web.Request) -> web.Response:
        """`/livez`: the process answers; asks nothing of consensus. Public: no API key needed."""
        query(request, ())
        return json_response(Live(status="ok", live=True, node_id=getattr(self.node, "node_id", ""),
                                  time=time.time()))

    async def _readiness(self, *, serving: bool) -> web.Response:
        now = time.time()
        node_id = getattr(self.node, "node_id", "")
        try:
            status: NodeStatus = await resolve(self.node.status())
        except (NotReady, QuorumLost) as e:
            return self._unready(node_id, False, None, now, str(e) or type(e).__name__)
        if not status.quorum:
            # a learner (joining, removed, or joined and not added) has no quorum however many
            # members it reaches: say why rather than count them ("3 of 3 members up")
            not_member = getattr(self.node, "not_member_reason", None)
            reason = not_member() if not_member is not None else None
            if reason is None:
                up = sum(1 for m in status.nodes if m.state == "up")
                reason = f"no quorum: {up} of {len(status.nodes)} members up, a majority is needed"
            return self._unready(status.node_id, False, status.leader, now, reason)
        why = _not_serving(self.node, status) if serving else None
        if why is not None:
            return self._unready(status.node_id, True, status.leader, now, why)
        return json_response(Health(
            status="ok", live=True, ready=True, node_id=status.node_id, quorum=status.quorum,
            leader=status.leader, time=now,
        ))

    @staticmethod
    def _unready(node_id: str, quorum: bool, leader: str | None, now: float, reason: str) -> web.Response:
        # a problem document (for clients that expect one on errors) extended with the health fields
        body = Unready(
            type="about:blank", title="Service Unavailable", status=503, detail=reason, live=True,
            ready=False, reason=reason, node_id=node_id, quorum=quorum, leader=leader, time=now,
        )
        return web.Response(body=msgspec.json.encode(body), status=503, content_type=PROBLEM_CONTENT_TYPE)

    async def nodes(self, request: web.Request) -> web.Response:
        query(request, ())
        status: NodeStatus = await resolve(self.node.status())
        return json_response([
            NodeEntry(id=m.id, address=m.address, state=m.state, leader=m.id == status.leader,  # type: ignore[arg-type]
                      management=m.management, http=m.http)
            for m in status.nodes
        ])

    async def members(self, request: web.Request) -> web.Response:
        query(request, ())
        epoch, cur, pend = self.node.member_info()
        return json_response(MemberSet(
            epoch, [MemberAddress(i, a) for i, a in cur],
            None if pend is None else [MemberAddress(i, a) for i, a in pend],
        ))

    async def add_node(self, request: web.Request) -> web.Response:
        query(request, ())
        body: AddNode = await read_body(request, AddNode)
        res = await self.node.add_member(body.id, body.address)
        self.log.info("member %s (%s) added: %s from slot %d", body.id, body.address, res.members,
                      res.from_slot)
        return json_response(MemberChanged(res.epoch, res.members, res.from_slot))

    async def remove_node(self, request: web.Request) -> web.Response:
        query(request, ())
        node_id = request.match_info["id"]
        res = await self.node.remove_member(node_id)
        self.log.info("member %s removed: %s from slot %d", node_id, res.members, res.from_slot)
        return json_response(MemberChanged(res.epoch, res.members, res.from_slot))

    async def list_keys(self, request: web.Request) -> web.Response:
        query(request, ())
        keys = self.keys.list()
        return json_response([KeyInfo(name=k["name"], role=k["role"], created=k["created"]) for k in keys])

    async def create_key(self, request: web.Request) -> web.Response:
        query(request, ())
        body: CreateKey = await read_body(request, CreateKey)
        value, key = await self.keys.create(body.name, body.role)
        self.log.info("API key %r (role %s) created", body.name, value.role)
        answer = NewKey(name=body.name, role=value.role, created=value.created, key=key)
        return json_response(answer, status=201)

    async def revoke_key(self, request: web.Request) -> web.Response:
        query(request, ())
        name = request.match_info["name"]
        await self.keys.revoke(name)
        self.log.info("API key %r revoked", name)
        return json_response(KeyRevoked(name=name, revoked=True))

    async def list_secrets(self, request: web.Request) -> web.Response:
        query(request, ())
        assert self.secrets is not None
        return json_response(self.secrets.list())

    async def set_secret(self, request: web.Request) -> web.Response:
        query(request, ())
        assert self.secrets is not None
        name = request.match_info["name"]
        body: SetSecret = await read_body(request, SetSecret)
        info, outcome = await self.secrets.set(name, body.value)
        if outcome == "unchanged":  # the value it had: nothing was written, nothing restarts
            self.log.debug("secret %r set to the value it has: unchanged (version %d)", name, info.version)
        else:
            self.log.info("secret %r %s (version %d)", name, outcome, info.version)
        return json_response(info, status=201 if outcome == "created" else 200)

    async def delete_secret(self, request: web.Request) -> web.Response:
        query(request, ())
        assert self.secrets is not None
        name = request.match_info["name"]
        await self.secrets.delete(name)
        self.log.info("secret %r deleted", name)
        return json_response(SecretDeleted(name=name, deleted=True))

    async def get_audit(self, request: web.Request) -> web.Response:
        text = query(request, ("limit",)).get("limit", "100")
        try:
            limit = int(text)
        except ValueError:
            raise BadRequest(f"limit must be an integer from 1 to 1000, not {text!r}") from None
        if not 1 <= limit <= 1000:
            raise BadRequest(f"limit must be from 1 to 1000, not {limit}")
        return json_response(self.audit.recent(limit))

    async def events(self, request: web.Request) -> web.StreamResponse:
        query(request, ())
        hub = self.hub
        resp = sse.stream_response()
        sub = hub.subscribe()
        try:
            await resp.prepare(request)
            hello = {"type": "hello", "node_id": getattr(self.node, "node_id", ""), "time": time.time(),
                     "last_id": hub.last_id}
            await resp.write(sse.frame("hello", hello))

            # wake up at least every second to notice a client that went away
            poll = min(self.heartbeat, 1.0)
            next_beat = time.monotonic() + self.heartbeat
            while True:
                try:
                    ev = await sub.next(poll)
                except StopAsyncIteration:
                    break
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                if ev is not None:
                    await resp.write(sse.frame(ev.type, ev.data, ev.id))
                    if ev.type == "dropped":
                        break
                elif time.monotonic() >= next_beat:
                    await resp.write(sse.KEEPALIVE)
                    next_beat = time.monotonic() + self.heartbeat
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            sub.close()
        return resp

    async def openapi(self, request: web.Request) -> web.Response:
        query(request, ())
        return json_response(self.document())


def _redacted(entry: KVEntry) -> KVEntry:
    """A `secrets/` entry without its value (the rest: created, updated, version)."""
    value = entry.value
    if isinstance(value, dict):
        return KVEntry(entry.key, {**value, "value": REDACTED})
    return KVEntry(entry.key, REDACTED)


def _not_serving(node: Any, status: NodeStatus) -> str | None:
    """Why a node with quorum does not serve yet (or any more), None when it does."""
    if getattr(node, "stopping", False) is True:  # its router drains, then it stops
        return "the node is stopping"
    if hasattr(node, "http") and node.http is None:
        return "the HTTP router is not running (the node is starting or stopping)"
    if status.journal_error:
        return f"the consensus journal failed: {status.journal_error}"
    if status.store_write_failing_for is not None:
        return (f"writes to the cluster store have failed for {status.store_write_failing_for:g} s: "
                f"{status.store_write_error or 'unknown error'}")
    return None


P = API_PREFIX
_SECURITY = ("security",)
_HAS_STORE: Final = lambda routes: routes.keys.kv is not None  # noqa: E731 (keys live in the replicated store)
_HAS_MEMBERS: Final = lambda routes: hasattr(routes.node, "add_member")  # noqa: E731 (a consensus node)

ROUTES: Final = (
    Route(
        "GET", f"{P}/status", NodeRoutes.status, "getStatus", "The cluster as this node sees it",
        {200: Answer(NodeStatus, "Node status")}, (400, 503),
    ),
    Route(
        "GET", f"{P}/kv", NodeRoutes.kv, "listKV",
        "Diagnostic listing of this node's copy of the replicated store",
        {200: Answer(KVListing, "Entries under the prefix, sorted by key")}, (400, 503),
        params=(query_param("prefix", "key prefix; all keys when absent or empty"),),
    ),
    Route(
        "GET", f"{P}/health", NodeRoutes.health, "getHealth", "Liveness and readiness (ready = has quorum)",
        {
            200: Answer(Health, "Ready"),
            503: Answer(Unready, "Not ready (no quorum, or starting)", media=PROBLEM_CONTENT_TYPE),
        },
        (400,),
    ),
    Route(
        "GET", "/livez", NodeRoutes.livez, "getLivez",
        "Liveness probe: the process answers (no quorum needed; no API key needed)",
        {200: Answer(Live, "Alive")}, (400,), tags=("probes",), public=True,
    ),
    Route(
        "GET", "/readyz", NodeRoutes.readyz, "getReadyz",
        "Readiness probe: quorum, and the node serves (router up, journal and store writes working); "
        "no API key needed",
        {
            200: Answer(Health, "Ready"),
            503: Answer(Unready, "Not ready; `reason` says why", media=PROBLEM_CONTENT_TYPE),
        },
        (400,), tags=("probes",), public=True,
    ),
    Route(
        "GET", f"{P}/nodes", NodeRoutes.nodes, "listNodes", "Configured members as this node sees them",
        {200: Answer(list[NodeEntry], "Members")}, (400, 503),
    ),
    Route(
        "GET", f"{P}/cluster/members", NodeRoutes.members, "getMembers",
        "The member set this node follows (changed only through the log)",
        {200: Answer(MemberSet, "Epoch, members and a pending set")}, (400,), when=_HAS_MEMBERS,
    ),
    Route(
        "POST", f"{P}/cluster/nodes", NodeRoutes.add_node, "addNode",
        "Add a member: the node must run (`aether node --join`), be reachable and have caught up; "
        "the change commits through the log (role admin)",
        {200: Answer(MemberChanged, "The new member set and the slot it governs from")},
        (400, 409, 503, 504), body=Body(AddNode, "The node's id and cluster address"), when=_HAS_MEMBERS,
        descriptions={409: "Refused: already a member, unreachable, not caught up, another change "
                      "pending, or too few live members; the message says which"},
    ),
    Route(
        "DELETE", f"{P}/cluster/nodes/{{id}}", NodeRoutes.remove_node, "removeNode",
        "Remove a member through the log (role admin)",
        {200: Answer(MemberChanged, "The new member set and the slot it governs from")},
        (400, 409, 503, 504), params=(path_param("id", "the member's node id"),), when=_HAS_MEMBERS,
        descriptions={409: "Refused: not a member, the last member, another change pending, or the "
                      "rest could not make progress; the message says which"},
    ),
    Route(
        "GET", f"{P}/keys", NodeRoutes.list_keys, "listKeys",
        "API keys stored in the cluster: name, role, created (role admin)",
        {200: Answer(list[KeyInfo], "Keys, by name")}, (400, 503), role="admin", tags=_SECURITY,
        when=_HAS_STORE,
    ),
    Route(
        "POST", f"{P}/keys", NodeRoutes.create_key, "createKey",
        "Create a key with a role (read, operate, admin); the answer holds the key, shown once (role admin)",
        {201: Answer(NewKey, "The key: name, role, created, key")}, (400, 409, 413, 503, 504), role="admin",
        body=Body(CreateKey, "The key's name and role"), tags=_SECURITY, when=_HAS_STORE,
    ),
    Route(
        "DELETE", f"{P}/keys/{{name}}", NodeRoutes.revoke_key, "revokeKey",
        "Revoke a key: every node refuses it once the removal is applied (role admin)",
        {200: Answer(KeyRevoked, "Revoked")}, (400, 404, 503, 504), role="admin",
        params=(path_param("name", "the key's name"),), tags=_SECURITY, when=_HAS_STORE,
    ),
    Route(
        "GET", f"{P}/secrets", NodeRoutes.list_secrets, "listSecrets",
        "Secrets stored in the cluster: names, creation and change times, versions; never the values",
        {200: Answer(list[SecretInfo], "Secrets, by name")}, (400, 503), tags=_SECURITY, when=_HAS_STORE,
    ),
    Route(
        "PUT", f"{P}/secrets/{{name}}", NodeRoutes.set_secret, "setSecret",
        "Create or change a secret (role admin). Slices whose config names it are restarted one "
        "instance at a time, or reconfigured through their reload hook",
        {
            201: Answer(SecretInfo, "Created: name, times, version (never the value)"),
            200: Answer(SecretInfo, "Changed: name, times, version (never the value)"),
        },
        (400, 413, 503, 504), role="admin", body=Body(SetSecret, "The value (UTF-8 text, at most 64 KiB)"),
        params=(path_param("name", "the secret's name", pattern=f"^{SECRET_NAME.pattern}$"),),
        tags=_SECURITY, when=_HAS_STORE,
    ),
    Route(
        "DELETE", f"{P}/secrets/{{name}}", NodeRoutes.delete_secret, "deleteSecret",
        "Delete a secret (role admin); refused while a blueprint's config names it",
        {200: Answer(SecretDeleted, "Deleted")}, (400, 404, 409, 503, 504), role="admin",
        params=(path_param("name", "the secret's name"),), tags=_SECURITY, when=_HAS_STORE,
        descriptions={404: "No such secret", 409: "A blueprint's config names the secret (detail names it)"},
    ),
    Route(
        "GET", f"{P}/audit", NodeRoutes.get_audit, "getAudit",
        "The newest write operations this node served (who, what, when, result), newest last (role admin)",
        {200: Answer(list[AuditEntry], "Audit entries")}, (400,), role="admin",
        params=(
            query_param(
                "limit", "at most this many entries (1-1000, default 100)",
                type="integer", minimum=1, maximum=1000,
            ),
        ),
        tags=_SECURITY,
    ),
    Route(
        "GET", f"{P}/events", NodeRoutes.events, "streamEvents",
        "Server-sent events of what this node sees (hello, node-joined, node-left, leader-changed, "
        "slice-state, slice-removed, blueprint-applied, blueprint-deleted, resync, dropped); a "
        "`: keepalive` comment every 15 s",
        {200: Answer(
            {"type": "string"}, "An endless event stream; each data line is a JSON object",
            media=sse.MEDIA_TYPE,
        )},
        (400,), tags=("events",), when=lambda routes: routes.hub is not None,
    ),
    Route(
        "GET", f"{P}/openapi.json", NodeRoutes.openapi, "getOpenAPI",
        "This document (the routes this node serves)",
        {200: Answer({"type": "object"}, "OpenAPI 3.1 document")}, tags=("meta",),
    ),
)
"""The endpoints every node serves (keys: when it has a replicated store; events: when it also has
a event bus)."""
