"""The HTTP router (docs/invocation.md): `RouteTable` (sans-IO matching, binding), `HttpRouter` (aiohttp)."""

from aether.http.routes import BodyTooLarge, CompiledRoute, Match, NoRoute, RouteTable, build_payload
from aether.http.server import HttpRouter

__all__ = ["BodyTooLarge", "CompiledRoute", "HttpRouter", "Match", "NoRoute", "RouteTable", "build_payload"]
