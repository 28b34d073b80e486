"""Core value types shared by every layer: node ids, addresses, errors, configuration, and the
context of the call being served (request id, idempotency key, trace context: `context`,
`tracing`).

Owns no I/O and imports nothing from the rest of `aether`.
"""
