"""The cluster state store: its interface (`contract.ClusterStore`, the value codec), typed
structured keys (`keys`), and the embedded backend: the replicated key-value state machine
(`machine`) and `store.KVStore` over consensus.

Owns the meaning of committed commands (get, put, remove, compare-and-set), the four key
families of `aether.kv.keys` plus a free-form `user/` family, and prefix watches delivered in commit
order. May import `aether.core` and `aether.consensus` (for the StateMachine protocol and
the asyncio adapter the `KVStore` facade wraps).
"""
