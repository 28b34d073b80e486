"""`org.example:hello` — a lean slice: one entry point, `greet`, also served at GET /hello/{name}."""

from __future__ import annotations

import msgspec

from aether.slices import Slice, route


class Greeting(msgspec.Struct, frozen=True):
    message: str
    node: str
    instance: int


class Hello(Slice):
    """Greets people; `config["greeting"]` changes the word (default "Hello")."""

    async def start(self) -> None:
        self.greeting = str(self.context.config.get("greeting", "Hello"))
        self.logger.info("hello instance %d starting on %s", self.context.instance, self.context.node_id)

    @route("GET", "/hello/{name}")
    async def greet(self, name: str) -> Greeting:
        """Greet `name`; says which node and instance answered."""
        return Greeting(f"{self.greeting}, {name}!", self.context.node_id, self.context.instance)
