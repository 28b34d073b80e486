"""Core value types shared by every layer: node ids, addresses, errors, configuration.

Owns no I/O and imports nothing from the rest of `aether`.
"""
