"""In-process invocation nodes for tests and benchmarks: the invoke layer without the node around it.

Each `InvokeNode` is a real `Transport` on loopback (port 0), an `InvokeServer` that is the
transport's `on_message`, and an `Invoker` on the node's own `EventBus`; the slice runtime and the
endpoint registry are whatever the caller hands in (fakes: `StaticRegistry` for the registry).
Several nodes share one event loop; `start_nodes` links them into one cluster, `stop_nodes` takes
them down again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aether.core.tracing import NOOP_TRACER, Tracer
from aether.core.types import Address
from aether.invoke import InvokeMessage, Invoker, InvokeServer
from aether.transport import EventBus, Transport

__all__ = ["Endpoint", "InvokeNode", "StaticRegistry", "make_invoke_node", "start_nodes", "stop_nodes"]

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Endpoint:
    """One slice instance's entry point, as the endpoint registry lists it."""

    artifact: str
    method: str
    instance: int
    node_id: str
    state: str = "ACTIVE"


class StaticRegistry:
    """Endpoints as a registry would cache them, fixed: never updated (not when a node dies either).

    A target is full coordinates or ``group:artifact`` (then every version matches)."""

    def __init__(self, eps: list[Endpoint]) -> None:
        self.eps = eps

    def instances(self, target: str, method: str) -> list[Endpoint]:
        return [
            e
            for e in self.eps
            if e.method == method and (e.artifact == target or e.artifact.startswith(target + ":"))
        ]


@dataclass
class InvokeNode:
    id: str
    transport: Transport
    bus: EventBus
    invoker: Invoker
    server: InvokeServer


def make_invoke_node(
    node_id: str,
    slices: Any,
    registry: Any,
    *,
    cluster_name: str,
    logger: logging.Logger,
    tracer: Tracer = NOOP_TRACER,
    **invoker_kw: Any,
) -> InvokeNode:
    """A node whose invoker and invoke server use `slices` (the slice runtime's calls: `has_room`,
    `local_instances`, `call`) and `registry` (`instances(target, method)`); not started.
    `invoker_kw` go to the `Invoker` (e.g. ``attempt_timeout``); `tracer` to invoker and server."""
    bus = EventBus()
    box: dict[str, InvokeServer] = {}
    transport = Transport(
        node_id,
        {node_id: Address(HOST, 0)},
        listen=Address(HOST, 0),
        cluster_name=cluster_name,
        message_type=InvokeMessage,
        on_message=lambda sender, msg: box["server"].dispatch(sender, msg),
        bus=bus,
        logger=logger,
    )
    invoker = Invoker(node_id, slices, registry, transport, bus=bus, tracer=tracer, **invoker_kw)
    server = InvokeServer(node_id, slices, transport, invoker=invoker, tracer=tracer)
    box["server"] = server
    return InvokeNode(node_id, transport, bus, invoker, server)


async def start_nodes(nodes: Sequence[InvokeNode], timeout: float = 10.0) -> None:
    """Start the nodes' transports, make the nodes the members of one cluster and wait until every
    node has a link up to every other (AssertionError after `timeout` seconds)."""
    for n in nodes:
        await n.transport.start()
    addresses = {n.id: Address(HOST, n.transport.port) for n in nodes}
    for n in nodes:  # no await in between
        n.transport.set_members(addresses)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(n.transport.up_peers >= addresses.keys() - {n.id} for n in nodes):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for the links between {', '.join(addresses)}")
        await asyncio.sleep(0.01)


async def stop_nodes(nodes: Iterable[InvokeNode], grace: float = 5.0) -> None:
    """Close each node's invoker, stop its invoke server (`grace` seconds for running calls) and
    its transport."""
    for n in nodes:
        n.invoker.close()
        await n.server.stop(grace=grace)
        await n.transport.stop()
