"""Management API of a node: HTTP/JSON endpoints under `/api/v1/` (docs/management-api.md).

Owns the aiohttp server (`aether.api.server.ManagementServer`), the `NodeView` protocol a node
implements for it, the JSON problem documents it answers errors with, and API-key checks.
Each `*_routes` module declares its routes once (`aether.api.routing.Route`: method, path, handler,
role, body and answer types); the server registers them, `auth` reads their roles and `openapi`
builds the document from them. The routes modules take their shared helpers from
`aether.api.common`; imports inside the package point one way (server -> auth, openapi -> routes ->
routing, common; contracts in pyproject).

May import `aether.core` and `aether.client`; never the node internals (transport, consensus,
kv, cluster, node): the node hands the server an object satisfying `NodeView` instead.
"""
