"""`org.example:greeter` — a service slice calling `org.example:hello` through the runtime.

`welcome` uses a plain typed call (`self.call`), `welcome_many` a typed proxy. The slice does not
import the hello slice's code: it declares the shapes it expects (`Greeting`, `HelloApi`), and
the runtime checks the answers against them.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import msgspec

from aether.slices import Slice, entry, route

HELLO = "org.example:hello"  # any deployed version (the dependency pattern lives in aether-slice.toml)


class Greeting(msgspec.Struct, frozen=True):
    message: str
    node: str
    instance: int


class HelloApi(Protocol):
    async def greet(self, name: str) -> Greeting: ...


class Welcome(msgspec.Struct, frozen=True):
    name: str


class WelcomeMany(msgspec.Struct, frozen=True):
    names: list[str]


class Welcomed(msgspec.Struct, frozen=True):
    text: str
    greeted_by: str  # "node/instance" of the hello instance that answered


class Greeter(Slice):
    """Welcomes people, asking the hello slice for the greeting."""

    @entry
    async def welcome(self, req: Welcome) -> Welcomed:
        g = await self.call(HELLO, "greet", req.name, Greeting)
        return Welcomed(f"Welcome! {g.message}", f"{g.node}/{g.instance}")

    @route("POST", "/greeter/welcome")
    async def welcome_many(self, req: WelcomeMany) -> list[Welcomed]:
        hello = self.proxy(HELLO, HelloApi)
        greetings = await asyncio.gather(*(hello.greet(n) for n in req.names))
        return [Welcomed(f"Welcome! {g.message}", f"{g.node}/{g.instance}") for g in greetings]
