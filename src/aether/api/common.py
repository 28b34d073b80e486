"""Helpers shared by the management API's server and its `*_routes` modules.

The routes modules import these from here, never from `aether.api.server` (which imports the routes
modules): the imports inside `aether.api` point one way, server -> auth, openapi -> routes ->
routing, common (checked by the `api-*` contracts in pyproject and tests/test_api_imports.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar
from urllib.parse import unquote_to_bytes

import msgspec
from aiohttp import web

from aether.core.errors import BadRequest
from aether.core.jsonbody import decode_json_body, require_json_content_type
from aether.core.problem import PROBLEM_CONTENT_TYPE, Problem

__all__ = [
    "API_PREFIX",
    "JSON_CONTENT_TYPE",
    "MAX_BODY",
    "Handler",
    "json_response",
    "problem_answer",
    "problem_response",
    "query",
    "read_body",
    "resolve",
    "timeout_param",
]

API_PREFIX: Final = "/api/v1"
JSON_CONTENT_TYPE: Final = "application/json"
MAX_BODY: Final = 1024 * 1024
"""Largest request body (the aiohttp application's own limit; the handlers answer 413 beyond)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_T = TypeVar("_T")


def problem_answer(problem: Problem, headers: dict[str, str] | None = None) -> web.Response:
    """The response carrying `problem` (``application/problem+json``, its status)."""
    return web.Response(
        body=problem.encode(), status=problem.status, content_type=PROBLEM_CONTENT_TYPE, headers=headers
    )


def problem_response(
    status: int, detail: str, *, title: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON problem document response with the given status code."""
    return problem_answer(Problem.of(status, detail, title=title), headers)


def json_response(data: object, status: int = 200) -> web.Response:
    """`data` encoded as JSON by msgspec (Structs, lists, dicts...)."""
    return web.Response(body=msgspec.json.encode(data), status=status, content_type=JSON_CONTENT_TYPE)


async def resolve(value: _T | Awaitable[_T]) -> _T:
    """`value`, awaited if it is awaitable (a `NodeView` may answer either way)."""
    if inspect.isawaitable(value):
        return await value
    return value


def _check_utf8_query(raw: str) -> None:
    """400 naming the parameter when a percent-decoded name or value is not UTF-8: aiohttp puts
    U+FFFD in place of such bytes, and `keys?prefix=%FF` listed the keys starting with U+FFFD."""
    if "%" not in raw and raw.isascii():
        return
    for part in raw.split("&"):
        name, _, value = part.partition("=")
        for text in (name, value):
            try:
                unquote_to_bytes(text.replace("+", " ").encode("utf-8", "surrogateescape")).decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequest(
                    f"query parameter {name!r} is not UTF-8 once percent-decoded; percent-encode the "
                    "UTF-8 bytes of names and values (e.g. 'é' as %C3%A9, '%' as %25)"
                ) from None


def query(request: web.Request, allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters of `request`, each at most once and all among `allowed` (else 400)."""
    allowed = tuple(allowed)
    out: dict[str, str] = {}
    _check_utf8_query(request.rel_url.raw_query_string)
    for name, value in request.query.items():
        if name not in allowed:
            accepts = ", ".join(allowed) if allowed else "no query parameters"
            raise BadRequest(f"unknown query parameter {name!r}; {request.path} accepts: {accepts}")
        if name in out:
            raise BadRequest(f"query parameter {name!r} given more than once")
        out[name] = value
    return out


async def read_body(request: web.Request, into: type[Any]) -> Any:
    """The request's JSON body decoded into `into` (a msgspec Struct); 400 when it is missing,
    too large, malformed or does not fit, 415 without a JSON content type."""
    raw = await request.read()
    if len(raw) > MAX_BODY:
        raise BadRequest(f"request body of {len(raw)} bytes exceeds the {MAX_BODY}-byte limit")
    if not raw.strip():
        raise BadRequest(f"{request.method} {request.path} needs a JSON body")
    require_json_content_type(request.headers.get("Content-Type"))
    value = decode_json_body(raw)  # malformed, too deep, integers beyond 64 bits: 400
    try:
        return msgspec.convert(value, type=into)
    except msgspec.ValidationError as e:
        raise BadRequest(f"invalid request body: {e}") from None


def timeout_param(request: web.Request, default: float) -> float:
    """The ``timeout`` query parameter in seconds (more than 0, at most 3600), else `default`."""
    text = request.query.get("timeout")
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"timeout must be a number of seconds, not {text!r}") from None
    if not 0 < value <= 3600:
        raise BadRequest("timeout must be between 0 and 3600 seconds")
    return value
