"""Management API endpoints for deployments: blueprints, deploy/scale/undeploy, slice status.

Thin handlers: bodies are decoded into typed structs at the edge, the work is done by the
node's `DeploymentService` (aether.deploy.operations). Any node can serve them: every change is
a write through consensus, so nothing needs forwarding to the leader.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from aiohttp import web

from aether.api.common import (
    API_PREFIX,
    MAX_BODY,
    json_response,
    problem_response,
    query,
    read_body,
    timeout_param,
)
from aether.api.routing import ANY_JSON, Answer, Body, ListOf, Named, Route, path_param, query_param
from aether.core.artifact import Artifact
from aether.core.context import check_idempotency_key
from aether.core.errors import BadRequest
from aether.core.jsonbody import decode_json_body, require_json_content_type
from aether.deploy.operations import ScaleBounds, SliceStatus
from aether.kv.keys import BlueprintValue, RolloutValue

__all__ = [
    "COORDINATES_PATTERN",
    "NAME_OR_COORDINATES_PATTERN",
    "ROUTES",
    "ApplyBlueprint",
    "DeployRequest",
    "DeploymentRoutes",
    "ScaleRequest",
    "UndeployRequest",
    "UpdateRequest",
]

_GROUP = r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9][A-Za-z0-9_-]*)*"
_ARTIFACT = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_VERSION = r"[0-9]+(\.[0-9]+)?(\.[0-9]+)?(-[0-9A-Za-z.-]+)?"
COORDINATES_PATTERN: Final = f"^{_GROUP}:{_ARTIFACT}:{_VERSION}$"
"""``group:artifact:version`` (the server parses and answers 400 with the reason when it does not fit)."""
NAME_OR_COORDINATES_PATTERN: Final = f"^{_GROUP}:{_ARTIFACT}(:{_VERSION})?$"
"""``group:artifact`` (every version) or ``group:artifact:version``."""

# documented patterns only (`extra_json_schema`): the server parses the coordinates itself and
# answers 400 with the reason
Coordinates = Annotated[
    str,
    msgspec.Meta(extra_json_schema={"pattern": COORDINATES_PATTERN, "description": "GROUP:ARTIFACT:VERSION"}),
]
NameOrCoordinates = Annotated[
    str,
    msgspec.Meta(
        extra_json_schema={
            "pattern": NAME_OR_COORDINATES_PATTERN,
            "description": "GROUP:ARTIFACT (every version) or GROUP:ARTIFACT:VERSION",
        }
    ),
]


class ApplyBlueprint(msgspec.Struct, forbid_unknown_fields=True):
    toml: str
    filename: str = "<blueprint>"


class DeployRequest(msgspec.Struct, forbid_unknown_fields=True):
    artifact: Coordinates
    # >= 1: 0 would mean undeploy, which is its own explicit operation
    instances: Annotated[int, msgspec.Meta(ge=1)] = 1


class ScaleRequest(msgspec.Struct, forbid_unknown_fields=True):
    """`instances` alone: the count of a fixed artifact, a pin (min = max = count) of an autoscaled
    one; `min`/`max`: the operator's bounds of an autoscaled artifact (the count is kept, clamped,
    unless `instances` is given too); `auto`: clear them (back to the blueprint's bounds)."""

    artifact: NameOrCoordinates
    instances: Annotated[int, msgspec.Meta(ge=1)] | None = None
    min: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max: Annotated[int, msgspec.Meta(ge=1)] | None = None
    auto: bool = False


class UndeployRequest(msgspec.Struct, forbid_unknown_fields=True):
    artifact: NameOrCoordinates


class UpdateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Roll `artifact` over to `version`; every other field overrides the blueprint's
    `[slices.NAME.rollout]` setting of the same name for this rollout."""

    artifact: NameOrCoordinates
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    strategy: Literal["rolling", "canary", "blue-green"] | None = None
    steps: list[Annotated[int, msgspec.Meta(ge=1, le=100)]] | None = None
    interval: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    max_p99_ratio: Annotated[float, msgspec.Meta(gt=0)] | None = None
    max_surge: Annotated[int, msgspec.Meta(ge=0)] | None = None
    max_unavailable: Annotated[int, msgspec.Meta(ge=0)] | None = None
    progress_deadline: Annotated[float, msgspec.Meta(gt=0)] | None = None
    min_calls: Annotated[int, msgspec.Meta(ge=1)] | None = None


class BlueprintDeleted(msgspec.Struct):
    id: str
    deleted: Literal[True]


class Scaled(msgspec.Struct):
    artifact: str
    instances: Annotated[int, msgspec.Meta(ge=1)] | None
    blueprints: Annotated[list[str], msgspec.Meta(description="ids of the blueprints changed")]
    autoscaled: Annotated[
        list[ScaleBounds], msgspec.Meta(description="the autoscaled artifacts matched, count and bounds now")
    ] = []


class Undeployed(msgspec.Struct):
    artifact: str
    blueprints: list[str]


def _not_found(bp_id: str) -> web.Response:
    return problem_response(404, f"no blueprint {bp_id!r}; `aether blueprint list` shows the ids")


class DeploymentRoutes:
    def __init__(self, service: Any, invoker: Any = None) -> None:
        self.svc = service
        self.invoker = invoker

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
        return json_response(BlueprintDeleted(id=bp_id, deleted=True))

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
        body = await read_body(request, ScaleRequest)
        out = await self.svc.scale_to(
            body.artifact, body.instances, min=body.min, max=body.max, auto=body.auto
        )
        return json_response(Scaled(body.artifact, body.instances, out.blueprints, out.autoscaled))

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
        payload = msgspec.msgpack.encode(arg)
        # every invoker error answers with the status it declares, as on the HTTP router
        # (aether.core.problem.problem_for, through the server's middleware)
        key = request.headers.get("Idempotency-Key")
        if key is None:  # the invoker makes a new key for the call
            out = await self.invoker.invoke(target, method, payload, timeout=timeout)
        else:
            if (problem := check_idempotency_key(key)) is not None:
                raise BadRequest(f"Idempotency-Key header: {problem}")
            out = await self.invoker.invoke(target, method, payload, timeout=timeout, idempotency_key=key)
        return json_response(msgspec.msgpack.decode(out))

    async def list_rollouts(self, request: web.Request) -> web.Response:
        return json_response(self.svc.rollouts())

    async def get_rollout(self, request: web.Request) -> web.Response:
        return json_response(self.svc.rollout(request.match_info["artifact"]))

    async def update(self, request: web.Request) -> web.Response:
        body = await read_body(request, UpdateRequest)
        overrides = {
            f: getattr(body, f) for f in body.__struct_fields__
            if f not in ("artifact", "version") and getattr(body, f) is not None
        }  # fmt: skip
        value, started = await self.svc.update_started(body.artifact, body.version, **overrides)
        # 200: the rollout to that version already exists (a repeated request), answered as it is
        return json_response(value, status=201 if started else 200)

    async def rollout_command(self, request: web.Request) -> web.Response:
        artifact, command = request.match_info["artifact"], request.match_info["command"]
        act = {
            "pause": self.svc.pause_rollout, "resume": self.svc.resume_rollout,
            "abort": self.svc.abort_rollout, "undo": self.svc.undo_rollout,
        }.get(command)  # fmt: skip
        if act is None:
            raise BadRequest(f"unknown rollout command {command!r}: use pause, resume, abort or undo")
        return json_response(await act(artifact))

    async def wait_rollout(self, request: web.Request) -> web.Response:
        timeout = timeout_param(request, 300.0)
        return json_response(await self.svc.wait_rollout(request.match_info["artifact"], timeout=timeout))

    async def undeploy(self, request: web.Request) -> web.Response:
        body = await read_body(request, UndeployRequest)
        changed = await self.svc.undeploy(body.artifact)
        return json_response(Undeployed(artifact=body.artifact, blueprints=changed))


P = API_PREFIX
BLUEPRINT_RECORD = Named(
    "BlueprintRecord",
    {
        "description": "A stored, expanded blueprint with its id",
        "allOf": [
            {"$ref": "#/components/schemas/BlueprintValue"},
            {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        ],
    },
    uses=(BlueprintValue,),
)
_DEP = ("deployment",)
_CONSENSUS = (400, 503, 504)
_ID = path_param("id", "blueprint id")
_ROLLOUT = ("rollouts",)
_NAME = path_param("artifact", "GROUP:ARTIFACT", pattern=NAME_OR_COORDINATES_PATTERN)


def _timeout(default: float) -> Any:
    return query_param(
        "timeout",
        f"seconds to wait (default {default:g}), more than 0 and at most 3600",
        type="number", exclusiveMinimum=0, maximum=3600,
    )


ROUTES: Final = (
    Route(
        "GET", f"{P}/slices", DeploymentRoutes.slices, "listSlices",
        "Desired and active instances per artifact, with per-node states",
        {200: Answer(list[SliceStatus], "Slice statuses")}, tags=_DEP,
    ),
    Route(
        "GET", f"{P}/blueprints", DeploymentRoutes.list_blueprints, "listBlueprints", "Stored blueprints",
        {200: Answer(ListOf(BLUEPRINT_RECORD), "Blueprints")}, tags=_DEP,
    ),
    Route(
        "POST", f"{P}/blueprints", DeploymentRoutes.apply_blueprint, "applyBlueprint",
        "Parse, expand and store a blueprint (replaces one with the same id)",
        {201: Answer(BLUEPRINT_RECORD, "The expanded blueprint")}, (*_CONSENSUS, 409), role="operate",
        body=Body(
            ApplyBlueprint,
            alternatives={"application/toml": {"type": "string"}, "text/plain": {"type": "string"}},
        ),
        tags=_DEP,
        descriptions={
            400: "Invalid body or blueprint; the detail names the file, line and problem",
            409: "A rollout of another version of one of its artifacts is active, or the blueprint "
                 "changed meanwhile (nothing stored; try again)",
        },
    ),
    Route(
        "GET", f"{P}/blueprints/{{id}}", DeploymentRoutes.get_blueprint, "getBlueprint",
        "One stored blueprint",
        {200: Answer(BLUEPRINT_RECORD, "The blueprint")}, (404,), params=(_ID,), tags=_DEP,
    ),
    Route(
        "DELETE", f"{P}/blueprints/{{id}}", DeploymentRoutes.delete_blueprint, "deleteBlueprint",
        "Delete a blueprint (its instances are stopped)",
        {200: Answer(BlueprintDeleted, "Deleted")}, (404, 503, 504), role="operate", params=(_ID,), tags=_DEP,
    ),
    Route(
        "POST", f"{P}/blueprints/{{id}}/wait", DeploymentRoutes.wait_blueprint, "waitBlueprint",
        "Wait until every instance of the blueprint is ACTIVE",
        {200: Answer(list[SliceStatus], "Converged statuses")}, (400, 404, 409, 504), role="operate",
        params=(_ID, _timeout(60.0)), tags=_DEP,
        descriptions={
            404: "No such blueprint",
            409: "An instance FAILED; detail gives the reason",
            504: "Not converged in time",
        },
    ),
    Route(
        "POST", f"{P}/deploy", DeploymentRoutes.deploy, "deploy",
        "Deploy an artifact (stored as the blueprint direct:GROUP:ARTIFACT)",
        {201: Answer(BlueprintValue, "The artifact's direct blueprint")}, _CONSENSUS, role="operate",
        body=Body(DeployRequest), tags=_DEP,
    ),
    Route(
        "POST", f"{P}/scale", DeploymentRoutes.scale, "scale",
        "Set the instance count of an artifact in every blueprint that has it; for an autoscaled "
        "artifact, pin its count or set (or clear, `auto`) the operator's bounds the controller "
        "scales within",
        {200: Answer(Scaled, "Blueprints changed")}, _CONSENSUS, role="operate", body=Body(ScaleRequest),
        tags=_DEP,
    ),
    Route(
        "GET", f"{P}/rollouts", DeploymentRoutes.list_rollouts, "listRollouts",
        "The latest rollout of every artifact that had one (active and finished)",
        {200: Answer(list[RolloutValue], "Rollouts")}, tags=_ROLLOUT,
    ),
    Route(
        "POST", f"{P}/rollouts", DeploymentRoutes.update, "update",
        "Roll an artifact over to another version in every blueprint that lists it (rolling, canary "
        "or blue-green, with health gates and automatic rollback)",
        {201: Answer(RolloutValue, "The rollout started"),
         200: Answer(RolloutValue, "A rollout to that version exists already (a repeated request)")},
        (400, 409, 503, 504), role="operate", body=Body(UpdateRequest), tags=_ROLLOUT,
        descriptions={409: "A rollout of the artifact to another version is in progress, or one to "
                           "this version runs with other settings"},
    ),
    Route(
        "GET", f"{P}/rollouts/{{artifact}}", DeploymentRoutes.get_rollout, "getRollout",
        "The latest rollout of one artifact: state, step, counts, traffic weights and history",
        {200: Answer(RolloutValue, "The rollout")}, (400, 404), params=(_NAME,), tags=_ROLLOUT,
    ),
    Route(
        "POST", f"{P}/rollouts/{{artifact}}/wait", DeploymentRoutes.wait_rollout, "waitRollout",
        "Wait until the rollout is no longer active (succeeded, rolled-back or aborted: see its state)",
        {200: Answer(RolloutValue, "The finished rollout")}, (400, 404, 504), role="operate",
        params=(_NAME, _timeout(300.0)), tags=_ROLLOUT,
    ),
    Route(
        "POST", f"{P}/rollouts/{{artifact}}/{{command}}", DeploymentRoutes.rollout_command, "rolloutCommand",
        "pause (freeze where it is), resume, abort (back to the old version) or undo (abort a running "
        "rollout; roll a finished one back to its old version)",
        {200: Answer(RolloutValue, "The rollout after the command")}, (400, 404, 409, 503, 504),
        role="operate",
        params=(_NAME, path_param("command", "the command", enum=["pause", "resume", "abort", "undo"])),
        tags=_ROLLOUT,
        descriptions={409: "The rollout's state does not allow the command; the detail says why"},
    ),
    Route(
        "POST", f"{P}/undeploy", DeploymentRoutes.undeploy, "undeploy",
        "Remove an artifact (G:A:V or G:A) from every blueprint",
        {200: Answer(Undeployed, "Blueprints changed")}, _CONSENSUS, role="operate",
        body=Body(UndeployRequest), tags=_DEP,
    ),
    Route(
        "POST", f"{P}/invoke/{{artifact}}/{{method}}", DeploymentRoutes.invoke, "invoke",
        "Call a slice entry point; JSON argument in, JSON answer out",
        {200: Answer(ANY_JSON, "The entry's answer")}, (400, 404, 502, 503, 504), role="operate",
        params=(
            path_param("artifact", "GROUP:ARTIFACT[:VERSION]", pattern=NAME_OR_COORDINATES_PATTERN),
            path_param("method", "entry point name"),
            _timeout(10.0),
        ),
        body=Body(ANY_JSON, "the entry's argument (empty body: null)", required=False),
        tags=("invoke",), descriptions={
            404: "Unknown entry", 503: "No ACTIVE instance of the artifact",
            502: "The entry failed, or a call to an entry that is not idempotent may or may not have taken "
                 "effect and was not repeated (IndeterminateOutcome)",
        },
        when=lambda routes: routes.invoker is not None,
    ),
)
"""The deployment endpoints (served when the node runs a deployment service)."""
