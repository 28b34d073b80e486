"""Test-support tools shipped with Aether (simulation, linearizability checking)."""
