"""Node data is private: files 0600, directories 0700, whatever the process umask.

In-process tests run under umask 022 (what most shells give), so they see the modes the code
sets itself; the process tests stat what real `aether node` processes and `aether cluster start`
left on disk. The machine runs the tests as root, which reads everything anyway: the mode bits
are what is checked.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from aether.cli import local_cluster as lc
from aether.consensus.storage import DiskStore
from aether.core.config import NodeConfig
from aether.core.files import make_private_dirs, prepare_private_dir, privatize_tree, write_private
from aether.core.types import Address, PeerSpec
from aether.maps.records import Record
from aether.maps.storage import SqliteStorage
from aether.node.node import Node
from aether.slices.libstore import install_wheel
from aether.slices.repository import Repository
from aether.slices.testing import build_library_wheel, build_slice_wheel
from conftest import LocalCluster, ProcessCluster, deploy_hello_examples, free_ports, http_json

pytestmark = pytest.mark.timeout(120)

SRC = """
from aether.slices import Slice, entry

class Echo(Slice):
    @entry
    async def echo(self, text: str) -> str:
        return text
"""


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def loose(root: Path) -> list[str]:
    """Everything under `root` (itself included) that group or others may access."""
    out = []
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        m = mode(p)
        if m & 0o077 or (p.is_dir() and m != 0o700) or (p.is_file() and m & 0o700 != 0o600):
            out.append(f"{p.relative_to(root.parent)} {m:o}")
    return out


# --- helpers -------------------------------------------------------------------------------------


def test_make_private_dirs_and_write_private(tmp_path: Path, umask022: None) -> None:
    created = make_private_dirs(tmp_path / "a" / "b" / "c")
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert [mode(d) for d in created] == [0o700] * 3
    assert make_private_dirs(tmp_path / "a" / "b") == []
    write_private(tmp_path / "a" / "f", b"secret")
    assert mode(tmp_path / "a" / "f") == 0o600 and (tmp_path / "a" / "f").read_bytes() == b"secret"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):
        make_private_dirs(tmp_path / "file")


def test_prepare_private_dir_tightens_an_old_dir_and_logs_once(
    tmp_path: Path, umask022: None, caplog: pytest.LogCaptureFixture
) -> None:
    old = tmp_path / "data"
    old.mkdir(mode=0o755)
    (old / "journal.bin").write_bytes(b"x")  # 0644, as older versions wrote it
    log = logging.getLogger("test.private")
    with caplog.at_level(logging.WARNING, logger="test.private"):
        prepare_private_dir(old, log)
        prepare_private_dir(old, log)
    assert mode(old) == 0o700
    assert [r.getMessage() for r in caplog.records] == [f"{old} was mode 755 (readable by other users); "
                                                        "changed to 700"]


def test_privatize_tree_keeps_owner_bits(tmp_path: Path) -> None:
    (tmp_path / "t" / "bin").mkdir(parents=True, mode=0o755)
    script = tmp_path / "t" / "bin" / "tool"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (tmp_path / "t" / "m.py").write_text("")
    (tmp_path / "t" / "m.py").chmod(0o644)
    privatize_tree(tmp_path / "t")
    assert mode(script) == 0o700 and mode(tmp_path / "t" / "m.py") == 0o600
    assert mode(tmp_path / "t" / "bin") == mode(tmp_path / "t") == 0o700


# --- what the node writes (in process) ------------------------------------------------------------


def test_consensus_journal_and_snapshot(tmp_path: Path, umask022: None) -> None:
    store = DiskStore(tmp_path / "data" / "consensus", "none")
    store.load()
    store.append([b"record"])
    store.save_snapshot(b"snapshot", [b"kept"])
    store.close()
    files = list((tmp_path / "data").rglob("*"))
    assert any(p.name.startswith("journal") for p in files) and any("snapshot" in p.name for p in files)
    assert loose(tmp_path / "data") == []


def test_sqlite_map_files(tmp_path: Path, umask022: None) -> None:
    eng = SqliteStorage(tmp_path / "maps" / "orders.sqlite")
    eng.put(0, "k", Record(b"v", 1, 1, 0))
    names = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert "orders.sqlite-wal" in names  # WAL mode: the side files exist while the database is open
    assert loose(tmp_path / "maps") == []
    eng.close()


def test_installed_wheels_and_repository(tmp_path: Path, umask022: None) -> None:
    repo = Repository(tmp_path / "repo")
    a = repo.deploy(build_slice_wheel(tmp_path / "w", "org.example:echo:0.1.0", SRC, "Echo"))
    repo.deploy_library(build_library_wheel(tmp_path / "w", "tinylib", "1.0"))
    assert repo.resolve(a).is_file()
    assert loose(repo.root) == []
    target = tmp_path / "data" / "runtime" / "slices" / "abc"
    install_wheel(repo.resolve(a), target)
    assert (target / "echo_slice" / "__init__.py").is_file()
    assert loose(tmp_path / "data") == []


def test_node_tightens_an_existing_data_dir(
    tmp_path: Path, umask022: None, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (port,) = free_ports(1)
    cfg = NodeConfig(node_id="node-1", peers=[PeerSpec("node-1", Address("127.0.0.1", port))],
                     cluster_port=port, management_port=0, http_port=0, data_dir=str(data),
                     repository=str(tmp_path / "repo"))
    with caplog.at_level(logging.WARNING):
        Node(cfg)
    assert mode(data) == 0o700
    assert loose(data) == []
    assert any("was mode 755" in r.getMessage() for r in caplog.records)


def test_local_cluster_record(tmp_path: Path, umask022: None) -> None:
    d = tmp_path / ".aether" / "cluster"
    lc.save_record(d, lc.ClusterRecord(host="127.0.0.1", port_offset=0, nodes=[]))
    assert mode(tmp_path / ".aether") == mode(d) == 0o700
    assert mode(d / lc.CLUSTER_FILE) == 0o600


def test_repl_history_file(tmp_path: Path, umask022: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from aether.cli import repl

    monkeypatch.setenv("AETHER_HISTORY", str(tmp_path / "home" / ".aether" / "history"))
    repl._history()  # lines may carry an --api-key
    assert mode(tmp_path / "home" / ".aether") == 0o700
    assert mode(tmp_path / "home" / ".aether" / "history") == 0o600


# --- real processes --------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_node_process_files_are_private(
    make_process_cluster: Callable[..., ProcessCluster], tmp_path: Path
) -> None:
    """A node started on a data dir another tool created 0755: it tightens it, and everything it
    writes (journal, snapshot, sqlite map, slice runtime) is private."""
    c = make_process_cluster(1, start=False)
    deploy_hello_examples(c.repository, tmp_path / "wheels")
    c.data_dir(0).mkdir(parents=True, mode=0o755)
    c.data_dir(0).chmod(0o755)
    c.start_all()
    c.wait_quorum(20)
    port = c.management_ports[0]
    status, doc = http_json(port, "POST", "/api/v1/maps",
                            {"name": "orders", "engine": "sqlite", "replicas": 1, "write_quorum": 1})
    assert status in (200, 201), doc
    put = "/api/v1/maps/orders/entries/k1"
    wait_for("a map write", lambda: http_json(port, "PUT", put, {"s": 1})[0] == 200)
    status, doc = http_json(port, "POST", "/api/v1/deploy", {"artifact": "org.example:hello:0.1.0",
                                                             "instances": 1})
    assert status in (200, 201), doc
    data = c.data_dir(0)
    wait_for("the slice's code in the runtime dir",
             lambda: (data / "runtime" / "slices").is_dir() and any((data / "runtime" / "slices").iterdir()))
    assert (data / "maps" / "orders.sqlite").is_file()
    assert any((data / "consensus").iterdir())
    assert mode(data) == 0o700
    assert loose(data) == []
    assert c.log_lines(0, "was mode 755")  # the node said it tightened its data dir
    pid = c.pid(0)
    assert c.stop(0) == 0
    assert loose(data) == []  # the final snapshot too
    assert not Path(f"/tmp/trace-node-1-{pid}.txt").exists()  # nothing written outside the data dir


def test_local_cluster_files_are_private(make_local_cluster: Callable[..., LocalCluster]) -> None:
    """`aether cluster start`: the cluster dir, cluster.json, pid files, logs and data."""
    c = make_local_cluster(1)
    r = c.start()
    assert r.returncode == 0, r.stdout + r.stderr
    assert c.api(0, "GET", "/api/v1/status")[0] == 200
    rec = lc.load_record(c.dir)
    assert rec is not None
    node = rec.nodes[0]
    for f in (c.dir / lc.CLUSTER_FILE, Path(node.pid_file), Path(node.log)):
        assert f.is_file() and mode(f) == 0o600, f"{f} {mode(f):o}"
    assert Path(node.data_dir).is_dir()
    assert loose(c.dir) == []
    r = c.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    assert loose(c.dir) == []


def test_replace_private_syncs_the_file_and_its_directory_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sync=True` (what a map's definition record needs: after a power cut an old record would
    have the new map's files deleted) fsyncs the new content before the rename and the directory
    after it; without it nothing is synced."""
    from aether.core import files

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "m.def"
    files.replace_private(target, b"7\n")
    assert synced == [] and target.read_bytes() == b"7\n"
    files.replace_private(target, b"9\n", sync=True)
    assert target.read_bytes() == b"9\n" and (target.stat().st_mode & 0o777) == 0o600
    assert synced == [str(tmp_path / "m.def.tmp"), str(tmp_path)]
    assert not (tmp_path / "m.def.tmp").exists()


def test_a_maps_definition_record_is_written_synced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aether.maps import service

    calls: list[dict[str, object]] = []
    real = service.replace_private

    def spy(path: Path, data: bytes, **kw: object) -> None:
        calls.append({"path": Path(path).name, **kw})
        real(path, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "replace_private", spy)
    svc = service.MapService.__new__(service.MapService)
    svc.data_dir = tmp_path
    svc.log = logging.getLogger("test")
    svc._claim_files("m", 12)
    assert calls == [{"path": "m.def", "sync": True}]
    assert (tmp_path / "m.def").read_text() == "12\n"
