"""Rabia consensus: the sans-IO engine, its wire messages, local persistence and the asyncio adapter.

Owns agreement on an ordered log of command batches and applying them, in order, to a
pluggable deterministic `StateMachine`. May import `aether.core` and (the adapter only)
`aether.transport`. Knows nothing about what the commands mean (that is `aether.kv`).
"""
