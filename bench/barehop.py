"""The bare loopback hop of the remote-call benchmarks (`remote_path_bench.py`, `invoke_bench.py
--rounds`): the physical floor of a remote call.

One `InvokeRequest` frame out, one `InvokeResponse` frame back, in the transport's framing and codec
with nothing of Aether around them; the caller awaits a future per call, resolved by id from the
read side. As on a link, the frames of one loop turn leave in one write (caller) and the answers to
one read in one write (echo server). `remote_path_bench.py` runs both ends on one loop,
`invoke_bench.py` in two processes (`--bare-serve`, `--bare-client`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from aether.invoke.messages import InvokeRequest, InvokeResponse
from aether.transport.framing import FrameDecoder
from aether.transport.messages import WireCodec

REPLY = b"\x83\xa7message\xacHello, bench!\xa4node\xa6node-2\xa8instance\x01"  # a Greeting's size
ARG = b"\xa5bench"  # the argument of every call: msgpack "bench"
CODEC = WireCodec((InvokeRequest, InvokeResponse))


def _no_delay(transport: Any) -> None:
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Echo(asyncio.Protocol):
    """The callee: answers every request at once with `REPLY`."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.frames = FrameDecoder()
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        out = []
        for payload in self.frames.feed(data):
            req = CODEC.decode(payload)
            out.append(CODEC.frame(InvokeResponse(req.id, REPLY, None, None)))
        if out:
            self.t.write(b"".join(out))


async def serve(host: str) -> asyncio.Server:
    """An echo server on `host`, a free port (``server.sockets[0].getsockname()[1]``)."""
    return await asyncio.get_running_loop().create_server(Echo, host, 0)


class Caller(asyncio.Protocol):
    """The caller's connection: `await caller.call()` is one round trip (the answer's payload)."""

    def __init__(self, artifact: str) -> None:
        self.artifact = artifact
        self.waiting: dict[int, asyncio.Future[bytes | None]] = {}
        self.pending: list[bytes] = []
        self.next_id = 0

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.loop = asyncio.get_running_loop()
        self.frames = FrameDecoder()
        _no_delay(transport)

    def data_received(self, data: bytes) -> None:
        for payload in self.frames.feed(data):
            resp = CODEC.decode(payload)
            fut = self.waiting.pop(resp.id, None)
            if fut is not None and not fut.done():
                fut.set_result(resp.payload)

    def _flush(self) -> None:
        self.t.write(b"".join(self.pending))
        self.pending.clear()

    async def call(self) -> bytes | None:
        self.next_id += 1
        cid = self.next_id
        fut = self.loop.create_future()
        self.waiting[cid] = fut
        self.pending.append(CODEC.frame(InvokeRequest(cid, self.artifact, "greet", ARG, "rid", 10000, "key")))
        if len(self.pending) == 1:
            self.loop.call_soon(self._flush)
        return await fut

    def close(self) -> None:
        self.t.close()


async def connect(host: str, port: int, artifact: str) -> Caller:
    """A caller connected to the echo server at `host`:`port`; its requests name `artifact`."""
    _, caller = await asyncio.get_running_loop().create_connection(lambda: Caller(artifact), host, port)
    return caller
