"""Problem documents (RFC 9457): the body of every error answer, and the one mapping of errors to them.

`problem_for(exc)` turns any exception into a `Problem`: an error that declares its HTTP `status`
(`aether.core.errors.AetherError.status`) answers with that status and its message (``detail``
attribute first, when the error carries one), anything else with 500 and a generic detail (its
text may hold internals; callers log it with the traceback: `is_internal`). The HTTP router, the
management API and the CLI (decoding an answer: `decode_problem`) all use this module.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

import msgspec

__all__ = [
    "INTERNAL_DETAIL",
    "PROBLEM_CONTENT_TYPE",
    "Problem",
    "decode_problem",
    "is_internal",
    "problem_detail",
    "problem_for",
    "problem_headers",
    "status_of",
    "status_title",
]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
INTERNAL_DETAIL: Final = (
    "internal error while handling the request; see the node log (`aether logs NODE --since 5m`)"
)


def status_title(status: int) -> str:
    """The HTTP reason phrase of `status` (RFC 9457: the title of an ``about:blank`` problem)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(msgspec.Struct, frozen=True):
    """An RFC 9457 problem document, the body of every error answer (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str

    @classmethod
    def of(cls, status: int, detail: str, *, title: str | None = None) -> Problem:
        """An ``about:blank`` problem; the title is the status's reason phrase unless given."""
        return cls("about:blank", status_title(status) if title is None else title, status, detail)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status `exc` declares (400-599), or None when it declares none (an internal error)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        return status
    return None


def is_internal(exc: BaseException) -> bool:
    """True when `exc` declares no status: answered 500 with `INTERNAL_DETAIL`; log its traceback."""
    return status_of(exc) is None


def problem_detail(exc: BaseException) -> str:
    """What the client reads about `exc`: its ``detail`` attribute when set (the remote entry's own
    message of an invoke error), else its text, else its type name."""
    detail = getattr(exc, "detail", None)
    if isinstance(detail, str) and detail:
        return detail
    return str(exc) or type(exc).__name__


def problem_headers(exc: BaseException) -> dict[str, str]:
    """The headers `exc` asks for (``Retry-After``, ``WWW-Authenticate``), if any."""
    headers = getattr(exc, "http_headers", None)
    return dict(headers()) if callable(headers) else {}


def problem_for(exc: BaseException) -> Problem:
    """The problem document answering `exc` (the one place errors become HTTP answers)."""
    status = status_of(exc)
    if status is None:
        return Problem.of(500, INTERNAL_DETAIL)
    return Problem.of(status, problem_detail(exc))


_LENIENT = msgspec.json.Decoder()


def decode_problem(body: bytes, status: int, reason: str = "") -> Problem:
    """The problem document of an error answer as a client reads it: the body's fields where it is a
    problem document (missing ones filled from `status` and `reason`), else the body's text (at most
    500 characters) as the detail."""
    try:
        doc = _LENIENT.decode(body)
    except msgspec.DecodeError:
        doc = None
    if isinstance(doc, dict):
        title, detail, kind = doc.get("title"), doc.get("detail"), doc.get("type")
        return Problem(
            kind if isinstance(kind, str) and kind else "about:blank",
            title if isinstance(title, str) and title else (reason or status_title(status)),
            status,
            detail if isinstance(detail, str) and detail else body.decode(errors="replace"),
        )
    return Problem("about:blank", reason or status_title(status), status,
                   body.decode(errors="replace").strip()[:500])
