"""The `aether` command line (click + rich), entry point `aether.cli.main:main`.

Owns the commands, their output (tables, `--json`) and exit codes (0 ok, 1 operation failed,
2 bad usage or configuration, 3 cannot connect), the synchronous management-API client
(`aether.cli.client`) and local multi-process clusters (`aether.cli.local_cluster`).

May import `aether.core` and the API's shared types/helpers (`aether.api`). The CLI talks to
nodes only over the management API; the one exception is `aether node`, which runs a node
in-process through `aether.node.runner` (imported lazily).
"""
