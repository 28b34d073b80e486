"""Numbers read from TOML documents (blueprints, the controller configuration) that the cluster
cannot keep or act on.

TOML integers are unbounded, and TOML floats include ``inf``, ``-inf`` and ``nan``. The store
(MessagePack) holds only 64-bit integers. A non-finite float has no JSON form (msgspec writes
``null``, so a blueprint read back through the API no longer decodes, and an entry's
``timeout = inf`` shows as "not set"), and none is a sensible duration, count, share or
threshold: a canary step of ``interval = inf`` is never over, a ``progress_deadline = inf`` never
rolls a hung version back, an alert ``threshold = nan`` is never crossed. The parsers call
`number_problem` on the whole parsed document before converting it into their typed Structs, so
every number of every table (free-form config tables included) is checked in one place and
refused naming its key. JSON bodies need no such check: the JSON decoder refuses ``NaN``,
``Infinity`` and out-of-range numbers such as ``1e999`` (`aether.core.jsonbody`).
"""

from __future__ import annotations

import math
from typing import Final

from aether.core.jsonbody import INT_MAX, INT_MIN

__all__ = ["INT_MAX", "INT_MIN", "NOT_FINITE", "OUT_OF_RANGE", "format_path", "number_problem"]

OUT_OF_RANGE: Final = "is out of range: integers must be between -2**63 and 2**64-1"
NOT_FINITE: Final = "is not a finite number: inf, -inf and nan are not accepted"

Path = tuple[str | int, ...]


def number_problem(value: object, path: Path = ()) -> tuple[Path, object, str] | None:
    """The first number in `value` (parsed TOML: tables, arrays, scalars) that the cluster cannot
    keep, as (key path, the number, what is wrong: `OUT_OF_RANGE` or `NOT_FINITE`); None when
    there is none. Array items add their index to the path."""
    if isinstance(value, dict):
        for k, v in value.items():
            if (found := number_problem(v, (*path, k))) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := number_problem(v, (*path, i))) is not None:
                return found
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
        return path, value, OUT_OF_RANGE
    elif isinstance(value, float) and not math.isfinite(value):
        return path, value, NOT_FINITE
    return None


def format_path(path: Path) -> str:
    """``scaling.panic_window``, ``alerts[0].threshold``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
