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
    """An instance being waited for reached FAILED; the message names artifact, node and reason."""


class ConvergenceTimeout(AetherError):
    """The cluster did not converge on the desired state in time; the message says what is missing."""
