"""Aether for Python: a distributed runtime for plain-Python slices.

Package layering, bottom to top (a lower layer never imports a higher one):
core -> transport -> consensus -> kv -> cluster -> node -> client / api -> cli.
"""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "aether-slices"  # the name on PyPI (pyproject.toml); `aether` there is another project

try:
    __version__ = version(DISTRIBUTION)  # pyproject.toml's `version`: said there only
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
