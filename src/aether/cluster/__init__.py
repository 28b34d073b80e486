"""Cluster-wide coordination helpers built on transport events: the leader manager.

May import `aether.core`, `aether.transport`.
"""
