"""Slices: the programming model, packaging, repository, loading and the per-node runtime.

Business code imports from here: `Slice`, `entry`, `route`, `SliceContext`, and the errors an entry
raises to answer with a 4xx (`BadRequest` 400, `NotFound` 404, `Conflict` 409, `SliceHttpError`).
The node and the deployment managers use `SliceRuntime`, `Repository` and `describe_slice`.

Modules: `api` (programming model: `Slice`, the decorators, `SliceContext`, `SliceCaller`), `errors`,
`maps` (`SliceMap`), `wheel` (packaging format), `repository` (local repository directory),
`libstore` (node-local installed code), `loader` (library resolution and import), `store`
(`SliceRuntime`), `isolation` (each artifact's own loop and thread), `workers` / `worker` /
`workerproto` (worker processes for slices that cannot share the node's interpreter: the node's
side, the process's main, the protocol and restart policy), `testing` (wheel builders and
invokers for tests). Behind `api`, private:
`_inspect` (class inspection, `describe_slice`), `_codec` (the MessagePack codec and `CodecCache`,
the caches of one loaded slice, which go when it is unloaded) and `_proxy` (typed calls, proxies).

Layering: `aether.slices` may import `aether.core` and `aether.kv.keys`; never deploy, invoke or
node. Importing this package loads only `api` (and its private modules) and `errors`; the
runtime classes are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aether.core.errors import BadRequest
from aether.slices.api import (
    EntryInfo,
    ParamInfo,
    RouteInfo,
    Slice,
    SliceCaller,
    SliceContext,
    SliceInfo,
    current_idempotency_key,
    current_request_id,
    describe_slice,
    entry,
    invoke_entry,
    route,
)
from aether.slices.errors import (
    ArtifactNotFound,
    Conflict,
    EntryBadRequest,
    InstanceOverloaded,
    InstanceStopping,
    InvalidWheel,
    NoLocalInstance,
    NotASliceWheel,
    NotFound,
    ResponseEncodeError,
    ResponseTypeError,
    SliceCallError,
    SliceDefinitionError,
    SliceError,
    SliceHttpError,
    SliceLoadError,
    SliceStartError,
    SliceStateError,
    UnknownEntry,
)

if TYPE_CHECKING:
    from aether.slices.loader import ImportSpace
    from aether.slices.repository import Repository
    from aether.slices.runtime import SliceRuntime
    from aether.slices.wheel import WheelInfo, inspect_wheel

__all__ = [
    "ArtifactNotFound",
    "BadRequest",
    "Conflict",
    "EntryBadRequest",
    "EntryInfo",
    "ImportSpace",
    "InstanceOverloaded",
    "InstanceStopping",
    "InvalidWheel",
    "NoLocalInstance",
    "NotASliceWheel",
    "NotFound",
    "ParamInfo",
    "Repository",
    "ResponseEncodeError",
    "ResponseTypeError",
    "RouteInfo",
    "Slice",
    "SliceCallError",
    "SliceCaller",
    "SliceContext",
    "SliceDefinitionError",
    "SliceError",
    "SliceHttpError",
    "SliceInfo",
    "SliceLoadError",
    "SliceRuntime",
    "SliceStartError",
    "SliceStateError",
    "UnknownEntry",
    "WheelInfo",
    "current_idempotency_key",
    "current_request_id",
    "describe_slice",
    "entry",
    "inspect_wheel",
    "invoke_entry",
    "route",
]

_LAZY = {
    "Repository": "aether.slices.repository",
    "SliceRuntime": "aether.slices.runtime",
    "ImportSpace": "aether.slices.loader",
    "WheelInfo": "aether.slices.wheel",
    "inspect_wheel": "aether.slices.wheel",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'aether.slices' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
