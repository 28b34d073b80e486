"""The "Examples:" section of every command's help (`aether CMD --help`), kubectl style.

`EXAMPLES` maps a command's path (``"map put"``) to its example lines; `attach` appends them to
each command's help as its epilog, in a ``\\b`` block so click prints the lines as written
(no rewrapping). tests/test_cli_conventions.py walks every command and checks that it has one,
so a new command needs its entry here (or an ``Examples:`` block of its own in its docstring,
as `aether update` and `aether rollout` have).
"""

from __future__ import annotations

import click

_D = "org.demo:place-order:0.1.0"  # artifact coordinates used in the examples

EXAMPLES: dict[str, list[str]] = {
    "": [
        "aether status                         # the cluster as the node at 127.0.0.1:9000 sees it",
        "aether --connect 10.0.0.5:9000 slices",
        "aether -o json nodes                  # any command's output as JSON (or yaml, wide)",
        "aether                                # the interactive shell (on a terminal)",
    ],
    "alerts": ["aether alerts", "aether alerts -o json"],
    "artifact": ["aether artifact list", "aether artifact deploy dist/place_order-0.1.0-py3-none-any.whl"],
    "artifact delete": [f"aether artifact delete {_D}", "aether artifact delete requests 2.32.3"],
    "artifact deploy": [
        "aether artifact deploy dist/*.whl                  # upload to the cluster's repository",
        "aether artifact deploy --repository ./repo dist/place_order-0.1.0-py3-none-any.whl",
    ],
    "artifact list": ["aether artifact list", "aether artifact list --libs -o json"],
    "artifact versions": ["aether artifact versions org.demo:place-order"],
    "audit": ["aether audit", "aether audit --limit 20 -o json"],
    "blueprint": ["aether blueprint list", "aether blueprint apply shop.blueprint --wait"],
    "blueprint apply": [
        "aether blueprint apply examples/order_demo/demo-order.blueprint",
        "aether blueprint apply shop.blueprint --wait --wait-timeout 300",
    ],
    "blueprint delete": ["aether blueprint delete demo-order:0.1.0"],
    "blueprint list": ["aether blueprint list", "aether blueprint list -o yaml"],
    "blueprint show": [
        "aether blueprint show demo-order:0.1.0",
        "aether blueprint show demo-order:0.1.0 -o json",
    ],
    "cert": ["aether cert init --dir tls", "aether cert issue node-1 --dir tls --san node1.example.com"],
    "cert init": ["aether cert init --dir tls --cluster-name prod"],
    "cert issue": ["aether cert issue node-1 --dir tls", "aether cert issue node-2 --dir tls --san 10.0.0.6"],
    "cluster": ["aether cluster start -n 3", "aether cluster status", "aether cluster stop"],
    "cluster add-node": ["aether cluster add-node node-4 127.0.0.1:7003"],
    "cluster demo": [
        "aether cluster demo",
        "aether cluster demo --wheels build/examples/order_demo "
        "--blueprint examples/order_demo/demo-order.blueprint",
    ],
    "cluster remove-node": ["aether cluster remove-node node-4"],
    "cluster restart": ["aether cluster restart node-3", "aether cluster restart node-2 node-3 --dir /tmp/c"],
    "cluster start": ["aether cluster start", "aether cluster start -n 5 --tls --dir /tmp/c"],
    "cluster status": ["aether cluster status", "aether cluster status --dir /tmp/c -o json"],
    "cluster stop": ["aether cluster stop", "aether cluster stop --dir /tmp/c --timeout 30"],
    "completion": [
        "aether completion bash > ~/.local/share/bash-completion/completions/aether",
        'eval "$(aether completion zsh)"                 # in ~/.zshrc',
        "aether completion fish > ~/.config/fish/completions/aether.fish",
    ],
    "controller": ["aether controller status", "aether controller decisions --follow"],
    "controller config": ["aether controller config", "aether controller config --set controller.toml"],
    "controller decisions": [
        "aether controller decisions --limit 20",
        "aether controller decisions -f -o json",
    ],
    "controller replay": ["aether controller replay observations.jsonl --config controller.toml"],
    "controller status": ["aether controller status", "aether controller status -o json"],
    "deploy": [f"aether deploy {_D}", f"aether deploy {_D} -n 3 --wait"],
    "doctor": ["aether doctor", "aether doctor --nodes 127.0.0.1:9000,127.0.0.1:9001 -o json"],
    "events": ["aether events", "aether events --json | jq .type"],
    "forge": ["aether forge --config examples/order_demo/forge-config.toml", "aether forge --nodes 5"],
    "forge scenario": [
        "aether forge scenario --list",
        "aether forge scenario ci --config examples/order_demo/forge-config.toml",
    ],
    "health": ["aether health", "aether health -o json"],
    "key": ["aether key create ci --role operate", "aether key list"],
    "key create": ["aether key create ci --role operate", "aether key create grafana --role read -o json"],
    "key list": ["aether key list", "aether key list -o yaml"],
    "key revoke": ["aether key revoke ci"],
    "kv": ["aether kv list slices/"],
    "kv list": ["aether kv list", "aether kv list routes/ -o json"],
    "map": ["aether map list", "aether map put orders o-1 '{\"qty\": 2}'", "aether map get orders o-1"],
    "map create": ["aether map create orders", "aether map create sessions --replicas 2 --write-quorum 1"],
    "map delete": ["aether map delete sessions"],
    "map get": ["aether map get orders o-1", "aether map get stock widget -o json"],
    "map keys": ["aether map keys orders", "aether map keys orders --prefix o-1"],
    "map list": ["aether map list", "aether map list -o json"],
    "map put": [
        "aether map put orders o-1 '{\"qty\": 2}'", "aether map put sessions s-9 '\"x\"' --ttl 60",
        "aether map put docs d-1 --file big.json",
    ],
    "map remove": ["aether map remove orders o-1"],
    "map stats": ["aether map stats orders", "aether map stats orders -o json"],
    "metrics": ["aether metrics", "aether metrics --watch --interval 2", "aether metrics -o json"],
    "node": [
        "aether node                                     # a cluster of one on 127.0.0.1",
        "aether node --id node-1 --peers node-1=10.0.0.5:7000,node-2=10.0.0.6:7000,node-3=10.0.0.7:7000",
        "aether node --id node-4 --join 10.0.0.5:7000",
    ],
    "nodes": ["aether nodes", "aether nodes --watch", "aether nodes -o yaml"],
    "rollout abort": ["aether rollout abort org.demo:place-order"],
    "rollout pause": ["aether rollout pause org.demo:place-order"],
    "rollout resume": ["aether rollout resume org.demo:place-order"],
    "rollout status": ["aether rollout status", "aether rollout status org.demo:place-order -o json"],
    "rollout undo": ["aether rollout undo org.demo:place-order"],
    "scale": [
        f"aether scale {_D} 5",
        "aether scale org.demo:place-order --min 2 --max 8      # autoscaled: the bounds",
    ],
    "secret": ["aether secret set db-password --from-file pw.txt", "aether secret list"],
    "secret delete": ["aether secret delete db-password"],
    "secret list": ["aether secret list", "aether secret list -o json"],
    "secret set": [
        "aether secret set db-password --from-file pw.txt",
        "printf s3cret | aether secret set db-password --from-file -",
    ],
    "slices": ["aether slices", "aether slices --watch", "aether slices -o json | jq '.[].artifact'"],
    "status": ["aether status", "aether status --watch", "aether status -o yaml"],
    "undeploy": [f"aether undeploy {_D}", "aether undeploy org.demo:place-order"],
}


def epilog(lines: list[str]) -> str:
    """The help epilog of `lines`: an "Examples:" heading and the lines kept as written."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def attach(group: click.Group) -> None:
    """Give `group` and every command under it the examples of `EXAMPLES` as its help epilog."""

    def walk(cmd: click.Command, path: str) -> None:
        lines = EXAMPLES.get(path)
        if lines and not cmd.epilog and "Examples:" not in (cmd.help or ""):
            cmd.epilog = epilog(lines)
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}".strip())

    walk(group, "")
