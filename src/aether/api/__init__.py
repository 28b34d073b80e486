"""Management API of a node: HTTP/JSON endpoints under `/api/v1/` (SPEC §7.1).

Owns the aiohttp server (`aether.api.server.ManagementServer`), the `NodeView` protocol a node
implements for it, the JSON problem documents it answers errors with, and API-key checks.
The `*_routes` modules take their shared helpers from `aether.api.common`; imports inside the
package point one way (server -> openapi -> routes -> common; contracts in pyproject).

May import `aether.core` and `aether.client`; never the node internals (transport, consensus,
kv, cluster, node): the node hands the server an object satisfying `NodeView` instead.
"""
