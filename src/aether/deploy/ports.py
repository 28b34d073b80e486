"""The shapes the deployment layer needs from layers it may not import (the layers in docs/architecture.md).

Owns: structural `Protocol`s for the slice runtime (written in `aether.slices`), the slice info it
returns, and the callables blueprint expansion uses to look at the artifact repository.
Anything with these attributes/methods works (duck typing); nothing here is implemented.
May import `aether.core` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from aether.core.artifact import Artifact, VersionPattern

DependenciesOf = Callable[[Artifact], Mapping[str, VersionPattern]]
"""`dependencies_of(artifact)` -> `{"group:artifact": pattern}`: the slices `artifact` calls."""

MapsOf = Callable[[Artifact], Sequence[str]]
"""`maps_of(artifact)` -> the names of the distributed maps the artifact declares it uses."""

Resolve = Callable[[str, VersionPattern], Artifact | None]
"""`resolve("group:artifact", pattern)` -> the best matching artifact in the repository, or None."""


class RouteInfo(Protocol):
    """One HTTP route a slice declares (`@route("GET", "/hello/{name}")` on entry `hello`).

    If the object also has `bindings: Mapping[str, str]` (argument -> "path" | "query" | "body"),
    that mapping is stored in the route's `RouteValue`; otherwise every path parameter binds
    from the path.
    """

    @property
    def http_method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def entry(self) -> str: ...

    @property
    def path_params(self) -> Sequence[str]: ...


class SliceInfo(Protocol):
    """What a loaded slice offers: its entry points (by name) and its routes."""

    @property
    def entries(self) -> Mapping[str, Any]: ...

    @property
    def routes(self) -> Sequence[RouteInfo]: ...


@runtime_checkable
class SliceRuntimePort(Protocol):
    """The per-node slice runtime driven by `NodeDeploymentManager`.

    Every method may raise; the exception's `str()` becomes the FAILED reason. Methods may be
    cancelled when a lifecycle step exceeds its deadline.
    """

    async def load(self, artifact: Artifact) -> SliceInfo: ...

    async def activate(self, artifact: Artifact, instances: list[int]) -> None: ...

    async def set_instances(self, artifact: Artifact, instances: list[int]) -> None: ...

    async def deactivate(self, artifact: Artifact) -> None: ...

    async def unload(self, artifact: Artifact) -> None: ...

    async def reconfigure(self, artifact: Artifact, instance: int) -> Any:
        """Give one ACTIVE instance the artifact's current config (restart it make-before-break, or
        call the slice's reload hook); raises if it cannot take it."""
        ...

    def info(self, artifact: Artifact) -> SliceInfo | None: ...
