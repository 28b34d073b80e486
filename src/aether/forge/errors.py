"""The errors Forge answers with (each carries its HTTP status; `aether.core.problem` turns it into
a problem document, in the REST API and in the CLI's messages alike)."""

from __future__ import annotations

from aether.core.errors import StatusError

__all__ = ["ForgeConflict", "ForgeError", "ForgeSetupError", "ForgeUnavailable", "NodeNotFound"]


class ForgeError(StatusError):
    """A Forge control failed; the message says why (500 unless a subclass says otherwise)."""


class ForgeSetupError(ForgeError):
    """Forge cannot start as asked: a directory it must not wipe, a taken port, a missing blueprint
    or wheels (400)."""

    status = 400


class NodeNotFound(ForgeError):
    """No such node (or slice) in this Forge cluster (404)."""

    status = 404


class ForgeConflict(ForgeError):
    """The control does not fit the node's or the cluster's state (409): killing a dead node,
    removing the last member, a second rolling restart, load controls without load."""

    status = 409


class ForgeUnavailable(ForgeError):
    """Nothing can serve the request right now: no node answers (503)."""

    status = 503
