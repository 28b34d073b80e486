"""Core value types shared by every layer: node ids, addresses, errors, configuration, the context
of the call being served (request id, idempotency key, trace context: `context`, `tracing`), and
the structured log records (`aether.core.logs`).

Owns no I/O (beyond logging's own handlers) and imports nothing from the rest of `aether`.
"""
