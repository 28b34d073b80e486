"""Aether for Python: a distributed runtime for plain-Python slices.

Package layering, bottom to top (a lower layer never imports a higher one):
core -> transport -> consensus -> kv -> cluster -> node -> client / api -> cli.
"""

__version__ = "0.1.0"
