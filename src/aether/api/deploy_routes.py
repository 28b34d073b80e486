"""Management API endpoints for deployments: blueprints, deploy/scale/undeploy, slice status.

Thin handlers: bodies are decoded into typed structs at the edge, the work is done by the
node's `DeploymentService` (aether.deploy.operations). Any node can serve them: every change is
a write through consensus, so nothing needs forwarding to the leader.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from aether.api.common import MAX_BODY, json_response, problem_response, query, read_body, timeout_param
from aether.core.artifact import Artifact
from aether.core.errors import BadRequest
from aether.core.jsonbody import decode_json_body, require_json_content_type


class ApplyBlueprint(msgspec.Struct, forbid_unknown_fields=True):
    toml: str
    filename: str = "<blueprint>"


class DeployRequest(msgspec.Struct, forbid_unknown_fields=True):
    artifact: str
    # >= 1: 0 would mean undeploy, which is its own explicit operation
    instances: Annotated[int, msgspec.Meta(ge=1)] = 1


class UndeployRequest(msgspec.Struct, forbid_unknown_fields=True):
    artifact: str


def _not_found(bp_id: str) -> web.Response:
    return problem_response(404, f"no blueprint {bp_id!r}; `aether blueprint list` shows the ids")


class DeploymentRoutes:
    def __init__(self, service: Any, invoker: Any = None) -> None:
        self.svc = service
        self.invoker = invoker

    def register(self, app: web.Application, prefix: str) -> None:
        r = app.router
        r.add_get(f"{prefix}/slices", self.slices)
        r.add_get(f"{prefix}/blueprints", self.list_blueprints)
        r.add_post(f"{prefix}/blueprints", self.apply_blueprint)
        r.add_get(f"{prefix}/blueprints/{{id}}", self.get_blueprint)
        r.add_delete(f"{prefix}/blueprints/{{id}}", self.delete_blueprint)
        r.add_post(f"{prefix}/blueprints/{{id}}/wait", self.wait_blueprint)
        r.add_post(f"{prefix}/deploy", self.deploy)
        r.add_post(f"{prefix}/scale", self.scale)
        r.add_post(f"{prefix}/undeploy", self.undeploy)
        if self.invoker is not None:
            r.add_post(f"{prefix}/invoke/{{artifact}}/{{method}}", self.invoke)

    async def slices(self, request: web.Request) -> web.Response:
        return json_response(self.svc.slices_status())

    async def list_blueprints(self, request: web.Request) -> web.Response:
        entries = self.svc.list_blueprints()
        return json_response([{"id": e.id, **msgspec.to_builtins(e.blueprint)} for e in entries])

    async def get_blueprint(self, request: web.Request) -> web.Response:
        bp_id = request.match_info["id"]
        value = self.svc.get_blueprint(bp_id)
        if value is None:
            return _not_found(bp_id)
        return json_response({"id": bp_id, **msgspec.to_builtins(value)})

    async def apply_blueprint(self, request: web.Request) -> web.Response:
        if request.content_type in ("application/toml", "text/plain"):
            raw = await request.read()
            if len(raw) > MAX_BODY:
                raise BadRequest(f"blueprint of {len(raw)} bytes exceeds the {MAX_BODY}-byte limit")
            try:
                body = ApplyBlueprint(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise BadRequest("blueprint is not UTF-8 text") from None
        else:
            body = await read_body(request, ApplyBlueprint)
        from aether.deploy.blueprint import parse_blueprint

        bp_id = parse_blueprint(body.toml, body.filename).id  # validates; errors are 400s
        value = await self.svc.apply_blueprint(body.toml, body.filename, source="api")
        return json_response({"id": bp_id, **msgspec.to_builtins(value)}, status=201)

    async def delete_blueprint(self, request: web.Request) -> web.Response:
        bp_id = request.match_info["id"]
        if not await self.svc.delete_blueprint(bp_id):
            return _not_found(bp_id)
        return json_response({"id": bp_id, "deleted": True})

    async def wait_blueprint(self, request: web.Request) -> web.Response:
        # DeploymentFailed answers 409, ConvergenceTimeout 504 (the statuses they declare)
        bp_id = request.match_info["id"]
        statuses = await self.svc.wait_converged(bp_id, timeout=timeout_param(request, 60.0))
        return json_response(statuses)

    async def deploy(self, request: web.Request) -> web.Response:
        body = await read_body(request, DeployRequest)
        if body.instances < 1:
            raise BadRequest("instances must be >= 1 (use undeploy to remove an artifact)")
        value = await self.svc.deploy(Artifact.parse(body.artifact), body.instances)
        return json_response(msgspec.to_builtins(value), status=201)

    async def scale(self, request: web.Request) -> web.Response:
        body = await read_body(request, DeployRequest)
        if body.instances < 1:
            raise BadRequest("instances must be >= 1 (use undeploy to remove an artifact)")
        changed = await self.svc.scale(body.artifact, body.instances)
        return json_response({"artifact": body.artifact, "instances": body.instances, "blueprints": changed})

    async def invoke(self, request: web.Request) -> web.Response:
        """Call an entry point through the node's invoker: JSON body in, JSON answer out."""
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise BadRequest(f"request body of {len(raw)} bytes exceeds the {MAX_BODY}-byte limit")
        query(request, ("timeout",))
        arg = None
        if raw.strip():
            require_json_content_type(request.headers.get("Content-Type"))
            arg = decode_json_body(raw)  # malformed, too deep, integers beyond 64 bits: 400
        target, method = request.match_info["artifact"], request.match_info["method"]
        timeout = timeout_param(request, 10.0)
        # every invoker error answers with the status it declares, as on the HTTP router
        # (aether.core.problem.problem_for, through the server's middleware)
        out = await self.invoker.invoke(target, method, msgspec.msgpack.encode(arg), timeout=timeout)
        return json_response(msgspec.msgpack.decode(out))

    async def undeploy(self, request: web.Request) -> web.Response:
        body = await read_body(request, UndeployRequest)
        changed = await self.svc.undeploy(body.artifact)
        return json_response({"artifact": body.artifact, "blueprints": changed})
