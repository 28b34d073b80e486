"""One module of this tree, or of git REF's tree, loaded under a name of its own, so that a
benchmark can run both side by side (`--baseline REF`); the rest of the package comes from this
tree. Used by `map_storage_bench.py` and `snapshot_bench.py`."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_module(path: Path, name: str) -> ModuleType:
    """The module in file `path`, as `name` (registered in `sys.modules`: msgspec resolves the
    module's annotations through it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def variants(relpath: str, stem: str, baseline: str | None) -> Iterator[dict[str, ModuleType]]:
    """``{"new": this tree's src/RELPATH}``, and ``"base"``: git `baseline`'s (when given), loaded
    from a temporary file removed on exit."""
    out = {"new": load_module(ROOT / "src" / relpath, f"{stem}_new")}
    tmp: Path | None = None
    try:
        if baseline:
            src = subprocess.run(
                ["git", "-C", str(ROOT), "show", f"{baseline}:src/{relpath}"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
                f.write(src)
            tmp = Path(f.name)
            out["base"] = load_module(tmp, f"{stem}_base")
        yield out
    finally:
        if tmp is not None:
            tmp.unlink()
