"""`aether.client`: the Python client library for the replicated store.

An external program connects to any node's cluster port and reads/writes keys; the client
fails over to the next node at once when its node dies and retries pending requests there.
Each request carries a session (client id, sequence), so a retried write takes effect at
most once. May import `aether.core`, `aether.transport`, `aether.kv` (messages only).
"""

from aether.client.client import AetherClient

__all__ = ["AetherClient"]
