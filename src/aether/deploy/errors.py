"""Errors raised by the deployment layer.

Owns: the exception types operators see from blueprint parsing/expansion and from waiting for
convergence. May import `aether.core` only.
"""

from __future__ import annotations

from aether.core.errors import AetherError, BadRequest


class BlueprintError(BadRequest):
    """A blueprint (or a deploy/scale/undeploy request) is invalid; the message names the file,
    the line when known, and the problem."""


class DeploymentFailed(AetherError):
    """An instance being waited for reached FAILED; the message names artifact, node and reason (409)."""

    status = 409


class ConvergenceTimeout(AetherError):
    """The cluster did not converge on the desired state in time; the message says what is missing
    (504)."""

    status = 504


class AdmissionRejected(BlueprintError):
    """A blueprint, deploy or scale would make the cluster run more slice instances than the
    configured limits (`max_instances_per_node`, `max_instances_per_cluster`) allow; the message
    names the limit, its value and the count asked for. Answered with 400 like every
    `BadRequest`; nothing was written."""


class RolloutConflict(AetherError):
    """A rollout command that the rollout's state does not allow (pause a finished rollout, start a
    third version while one rollout runs, ...); the message says what is possible instead (409)."""

    status = 409


class RolloutNotFound(AetherError):
    """No rollout of the named artifact is recorded (404)."""

    status = 404


class BlueprintNotFound(AetherError):
    """No blueprint with the id waited for (404, as `POST /api/v1/blueprints/{id}/wait` declares)."""

    status = 404
