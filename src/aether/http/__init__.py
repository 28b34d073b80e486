"""The HTTP router (SPEC §5): `RouteTable` (sans-IO matching and binding) and `HttpRouter` (aiohttp)."""

from aether.http.routes import BodyTooLarge, CompiledRoute, Match, NoRoute, RouteTable, build_payload
from aether.http.server import HttpRouter

__all__ = ["BodyTooLarge", "CompiledRoute", "HttpRouter", "Match", "NoRoute", "RouteTable", "build_payload"]
