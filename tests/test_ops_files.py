"""The files operators run Aether with (docs/operations.md): the Dockerfile, the systemd unit and its
`aether.toml`, and the Kubernetes manifest. Each is checked by the validator that can run here
(hadolint, systemd-analyze, kubernetes-validate; a missing one skips with the reason), and the
`aether node` command line each one gives is run through the real CLI with real certificates,
up to the point where the node would start, so a renamed flag or setting fails here first."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from aether.cli.main import main
from aether.core.config import NodeConfig

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "ops" / "systemd" / "aether-node.service"
NODE_TOML = ROOT / "ops" / "systemd" / "aether.toml"
MANIFEST = ROOT / "ops" / "kubernetes" / "aether.yaml"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed here (it comes with `make install`; see pyproject dev extras)")
    return found


# --- running `aether node ARGS` up to the start ----------------------------------------------------------


def _certificates(tmp: Path, node_ids: list[str]) -> Path:
    tls = tmp / "tls"
    runner = CliRunner()
    assert runner.invoke(main, ["cert", "init", "--dir", str(tls)]).exit_code == 0
    for nid in node_ids:
        res = runner.invoke(main, ["cert", "issue", nid, "--dir", str(tls), "--san", "localhost"])
        assert res.exit_code == 0, res.output
    return tls


def _start(args: list[str], monkeypatch: pytest.MonkeyPatch) -> NodeConfig:
    """Run `aether node ARGS` with the node runtime replaced: returns the config it would start with."""
    started: list[NodeConfig] = []

    def run_node(config: NodeConfig, **_: Any) -> int:
        started.append(config)
        return 0

    monkeypatch.setattr("aether.node.runner.run_node", run_node)
    for var in ("AETHER_API_KEY", "AETHER_CLUSTER_SECRET", "AETHER_CLUSTER_SECRET_FILE", "AETHER_REPOSITORY"):
        monkeypatch.delenv(var, raising=False)
    res = CliRunner().invoke(main, ["node", *args])
    assert res.exit_code == 0, f"aether node {shlex.join(args)}\n{res.output}"
    (config,) = started
    return config


def _relocate(text: str, tmp: Path) -> str:
    """The files' absolute paths, moved under `tmp` (the certificates are made there)."""
    return (
        text.replace("/etc/aether/tls/", f"{tmp}/tls/")
        .replace("/etc/aether/api/key", f"{tmp}/api-key")
        .replace("/etc/aether/api-key", f"{tmp}/api-key")
        .replace("/etc/aether/aether.toml", f"{tmp}/aether.toml")
        .replace("/var/lib/aether", f"{tmp}/var")
    )


def _public_get_paths() -> set[str]:
    """The management API's routes that answer GET without an API key (the probes)."""
    from aether.api.node_routes import ROUTES

    return {r.path for r in ROUTES if r.public and r.method == "GET"}


def test_the_probes_the_files_use_are_public_routes_of_the_management_api() -> None:
    public = _public_get_paths()
    assert {"/livez", "/readyz"} <= public
    files = DOCKERFILE.read_text() + MANIFEST.read_text()
    used = set(re.findall(r"/(?:livez|readyz|healthz|health)\b", files))
    assert used and used <= public, f"probes used {sorted(used)}, public routes {sorted(public)}"


# --- Dockerfile ---------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _final_stage(path: Path) -> list[tuple[str, str]]:
    steps = _instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint")
    res = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    hadolint = _tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text() + "\nUSER root\n")
    res = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "DL3002" in res.stdout  # last USER should not be root


def test_the_image_runs_the_node_as_an_unprivileged_user_with_a_health_check() -> None:
    final = _final_stage(DOCKERFILE)
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert int(users[-1].split(":")[0]) >= 1000
    (health,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "/livez" in health
    exposed = {int(p) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    defaults = NodeConfig(node_id="node-1", peers=[])
    assert {7000, defaults.management_port, defaults.http_port} == exposed
    for word, rest in _instructions(DOCKERFILE):
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_the_image_command_line_starts_a_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = _final_stage(DOCKERFILE)
    (entry,) = [rest for word, rest in final if word == "ENTRYPOINT"]
    (cmd,) = [rest for word, rest in final if word == "CMD"]
    assert yaml.safe_load(entry) == ["aether", "node"]
    args = yaml.safe_load(_relocate(cmd, tmp_path))  # JSON arrays
    # docs/operations.md mounts the node's files at /etc/aether, laid out as on a systemd host:
    # its aether.toml (node-1's: ops/systemd/aether.toml), tls/ and the bootstrap key api-key
    _certificates(tmp_path, ["node-1"])
    (tmp_path / "api-key").write_text("k" * 32 + "\n")
    (tmp_path / "aether.toml").write_text(_relocate(NODE_TOML.read_text(), tmp_path))
    config = _start(args, monkeypatch)
    assert config.host == "0.0.0.0" and config.data_dir == f"{tmp_path}/var/data"
    # a node listening beyond loopback refuses to start without an API key (and without mutual
    # TLS or a cluster secret): the image's command line gives it both from those files. Without
    # --api-key-file in CMD, `docker run` as documented started a node that exited at once.
    assert config.api_key == "k" * 32
    assert config.tls_cert == f"{tmp_path}/tls/node-1.crt" and config.https


# --- systemd ------------------------------------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = tmp_path / "aether-node.service"
    # the unit names /opt/aether/bin/aether: point it at this installation's
    unit.write_text(UNIT.read_text().replace("/opt/aether/bin/aether", str(BIN / "aether")))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    unit.write_text(unit.read_text().replace("Restart=on-failure", "Restart=on-failure\nRestartt=always"))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Restartt" in res.stderr  # a misspelt setting is reported: the check above means something


def test_the_systemd_unit_runs_the_example_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _unit()["Service"]
    assert service["User"] == ["aether"] and service["NoNewPrivileges"] == ["yes"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(_relocate(exec_start, tmp_path))
    assert argv[:2] == ["/opt/aether/bin/aether", "node"]
    settings = tomllib.loads(NODE_TOML.read_text())["node"]
    assert settings["data_dir"].startswith("/var/lib/aether")  # the unit's StateDirectory
    _certificates(tmp_path, [settings["node_id"]])
    (tmp_path / "api-key").write_text("k" * 32 + "\n")
    (tmp_path / "aether.toml").write_text(_relocate(NODE_TOML.read_text(), tmp_path))
    config = _start(argv[2:], monkeypatch)
    assert config.node_id == "node-1" and [p.id for p in config.peers] == ["node-1", "node-2", "node-3"]
    assert config.https and config.tls_ca == f"{tmp_path}/tls/ca.crt"
    assert config.api_key == "k" * 32


# --- Kubernetes ---------------------------------------------------------------------------------------------


def _documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_the_kubernetes_manifest_validates_strictly(tmp_path: Path) -> None:
    validate = _tool("kubernetes-validate")
    res = subprocess.run([validate, "--strict", str(MANIFEST)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.read_text().replace("readinessProbe:", "readinesProbe:"))
    res = subprocess.run([validate, "--strict", str(bad)], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0  # a misspelt field fails: the check above means something


def test_every_pod_of_the_stateful_set_starts_with_its_own_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (sts,) = [d for d in _documents() if d["kind"] == "StatefulSet"]
    spec = sts["spec"]
    replicas = spec["replicas"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    names = [f"{sts['metadata']['name']}-{i}" for i in range(replicas)]
    _certificates(tmp_path, names)
    (tmp_path / "api-key").write_text("k" * 32)
    for name in names:
        args = [re.sub(r"\$\(POD_NAME\)", name, _relocate(a, tmp_path)) for a in container["args"]]
        config = _start(args, monkeypatch)
        assert config.node_id == name
        assert [p.id for p in config.peers] == names
        # every member's address is its stable name under the headless service
        assert {str(p.address) for p in config.peers} == {f"{n}.{spec['serviceName']}:7000" for n in names}
        monkeypatch.undo()
