"""`aether.api.routing`: routes declared once, registered from the list, and the role table the
middleware enforces derived from the same declarations (never weaker than the hand-written table
it replaced)."""

from __future__ import annotations

import itertools
import re
from typing import Any

from aiohttp import web

from aether.api.auth import declared_routes, required_role
from aether.api.routing import ROLES, Answer, Principal, RoleTable, Route, canonical, register

# The table `aether.api.auth` had before the routes declared their roles (first match wins), plus
# the artifact repository's writes (operate, like deploying) and the controller's configuration
# (operate, like scaling: it sets how the cluster scales) and rollouts (operate, like deploying), added
# after it.
_OLD_TABLE = (
    ("*", r"/api/v1/keys(/[^/]*)?", "admin"),
    ("*", r"/api/v1/audit", "admin"),
    ("read", r".*", "read"),
    (
        "write",
        r"/api/v1/(deploy|scale|undeploy|blueprints(/.*)?|maps(/.*)?|invoke/.*|repository/.*|controller/config"
        r"|rollouts(/.*)?)",
        "operate",
    ),
    ("write", r".*", "admin"),
)


def _old_role(method: str, path: str) -> str:
    kind = "read" if method in ("GET", "HEAD") else "write"
    return next(r for m, p, r in _OLD_TABLE if m in ("*", kind) and re.fullmatch(p, path))


def _sample_paths() -> set[str]:
    paths = {"/", "/metrics", "/api/v1", "/api/v1/", "/api/v1/nothing", "/api/v1/keys/a/b"}
    paths.add("/api/v1/invoke/a")
    for r in declared_routes():
        path = re.sub(r"\{\w+(:[^{}]*)?\}", "x", r.path)
        paths |= {path, path + "/", path + "/y", path + "/y/z", path.rsplit("/", 1)[0] + "/"}
    return paths


def test_the_derived_roles_are_never_weaker_than_the_old_table() -> None:
    for method, path in itertools.product(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"), _sample_paths()):
        new, old = required_role(method, path), _old_role(method, path)
        assert ROLES.index(new) >= ROLES.index(old), (method, path, new, old)  # type: ignore[arg-type]


def test_every_served_route_keeps_its_old_role() -> None:
    # on the paths that exist the two tables agree exactly (stricter only on paths no route serves)
    for r in declared_routes():
        path = re.sub(r"\{\w+(:[^{}]*)?\}", "x", r.path)
        assert required_role(r.method, path) == _old_role(r.method, path) == r.needs, (r.method, r.path)


async def _h(owner: Any, request: web.Request) -> web.Response:
    return web.Response(text=str(owner))


def _route(method: str, path: str, role: Any = None, **kw: Any) -> Route:
    return Route(method, path, _h, f"{method}{path}", "s", {200: Answer({}, "ok")}, role=role, **kw)


def test_role_table_rules() -> None:
    table = RoleTable([
        _route("GET", "/a"), _route("POST", "/a", "operate"), _route("DELETE", "/k/{name}", "admin"),
        _route("PUT", "/m/{name}/e/{key:.+}", "operate"),
    ])
    assert table.role("GET", "/a") == table.role("HEAD", "/a") == "read"
    assert table.role("POST", "/a") == "operate"
    assert table.role("PUT", "/a") == "operate"  # a write the path does not declare: its writes' role
    assert table.role("GET", "/k/x") == "admin"  # a read on an admin-only path
    assert table.role("POST", "/k/x") == "admin"
    assert table.role("PUT", "/m/n/e/a/b") == "operate"  # a `{key:.+}` spans slashes
    assert table.role("GET", "/elsewhere") == "read" and table.role("POST", "/elsewhere") == "admin"
    assert table.role("POST", "/a/") == "admin"  # not weaker than /a, and /a/ itself is undeclared
    # the default role: read for GET, admin for any write (fail closed)
    assert _route("GET", "/x").needs == "read" and _route("PATCH", "/x").needs == "admin"
    assert Principal("p", "operate").allows("read") and not Principal("p", "operate").allows("admin")


def test_register_binds_handlers_and_honours_when() -> None:
    app = web.Application()
    routes = [_route("GET", "/a/{key:.+}"), _route("POST", "/b", when=lambda owner: owner == "no")]
    served = register(app, "owner", routes)
    assert served == routes[:1]
    got = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    assert got == {("GET", "/a/{key}"), ("HEAD", "/a/{key}")}
    assert canonical("/a/{name}/e/{key:.+}") == "/a/{name}/e/{key}"
