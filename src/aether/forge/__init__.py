"""Aether Forge: a local cluster of real node processes to watch and break (docs/forge.md).

Owns the supervisor of the node processes it starts (`supervisor`: start, kill, crash, stop,
restart, add, remove, rolling restart, and the network and slice faults it asks the nodes to
inject), the load generator (`config`, `templates`, `load`: targets, rates, ramps, schedules,
client-side latency histograms, traces recorded and replayed), the dashboard and its REST API
(`server`, `static/`: every control of the page is an endpoint in its OpenAPI document) and the
scenarios run headless with a pass/fail report (`scenarios`).

Forge talks to its nodes only as a user would: their processes and their management API. It may
import `aether.core` (and the lower layers' value types); the `aether forge` command in
`aether.cli` is above it.
"""
