"""One Aether node as an object: transport, consensus, KV store, leader manager, management API.

`Node` wires the layers below together and is what `aether node` runs (`runner.run_node`).
Many nodes can live in one process (tests, Forge). May import every lower layer; the management
API (`aether.api`, a higher layer) is handed to `Node` as a constructor argument. Its tracer
(`tracing.make_tracer`; the OpenTelemetry adapter `otel`, imported only when tracing is on) is
handed to the router, the invoker, the invoke server and the maps.
"""
