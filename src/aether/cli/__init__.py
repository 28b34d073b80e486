"""The `aether` command line (click + rich), entry point `aether.cli.main:main`.

Owns the commands, their output (tables, `-o table|wide|json|yaml`, `--json`, `--watch`, the
help's examples in `aether.cli.examples`) and exit codes (0 ok, 1 operation failed, 2 bad usage
or configuration, 3 cannot connect), how a `--connect` value becomes a management-API client
(`aether.cli.client`; the client itself is the public `aether.client.management`) and local
multi-process clusters (`aether.cli.local_cluster`).

Imports point one way: `main` (the group, and the `status`, `kv`, `node` and `cluster`
commands) registers the commands of the other modules (`deploy`, `maps`, `metrics`, `ops`,
`security`, `tls`, `artifact`), which import `common` (settings, exit codes, output helpers,
the client factory and error reporting) and never `main`.

May import `aether.core` and the API's shared types/helpers (`aether.api`). The CLI talks to
nodes only over the management API; the one exception is `aether node`, which runs a node
in-process through `aether.node.runner` (imported lazily).
"""
