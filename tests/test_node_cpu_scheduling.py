"""The node's CPU scheduling policy (`cpu_scheduling`, `aether node --cpu-scheduling`): every thread
of a node process runs under SCHED_BATCH unless told "normal" (docs/operations.md, *CPU*)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from aether.cli.main import main
from aether.core.config import ConfigError, NodeConfig
from aether.core.types import Address, PeerSpec

pytestmark = pytest.mark.timeout(120)

needs_sched = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH") or not os.path.isdir("/proc/self/task"),
    reason="SCHED_BATCH and /proc/self/task are Linux's",
)


def _policies(pid: int) -> dict[int, int]:
    """Thread id -> scheduling policy of every thread of process `pid`."""
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(t)] = os.sched_getscheduler(int(t))
        except ProcessLookupError:
            pass  # ended meanwhile
    return out


def test_cpu_scheduling_is_a_node_setting_batch_by_default() -> None:
    peers = [PeerSpec("node-1", Address("127.0.0.1", 7000))]
    assert NodeConfig(node_id="node-1", peers=peers).validate().cpu_scheduling == "batch"
    normal = NodeConfig(node_id="node-1", peers=peers, cpu_scheduling="normal").validate()
    assert normal.cpu_scheduling == "normal"
    with pytest.raises(ConfigError, match="cpu_scheduling must be batch or normal \\(got 'fifo'\\)"):
        NodeConfig(node_id="node-1", peers=peers, cpu_scheduling="fifo").validate()


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, "batch"),
        (["--cpu-scheduling", "normal"], {}, "normal"),
        ([], {"AETHER_CPU_SCHEDULING": "normal"}, "normal"),
    ],
)
def test_aether_node_takes_cpu_scheduling_from_its_flag_and_env(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str], expected: str
) -> None:
    import aether.node.runner as runner

    seen: dict[str, Any] = {}

    def fake_run(config: NodeConfig, **_: Any) -> int:
        seen["policy"] = config.cpu_scheduling
        return 0

    monkeypatch.setattr(runner, "run_node", fake_run)
    monkeypatch.delenv("AETHER_CPU_SCHEDULING", raising=False)
    r = CliRunner().invoke(main, ["node", "--fsync", "none", *args], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen == {"policy": expected}
    bad = CliRunner().invoke(main, ["node", "--cpu-scheduling", "idle"])
    assert bad.exit_code == 2 and "'idle' is not one of 'batch', 'normal'" in bad.output


@needs_sched
def test_set_cpu_scheduling_covers_the_threads_running_and_those_started_later() -> None:
    """In a process of its own (the policy is the process's threads'): a thread started before the
    call and one started after both run under the policy set, and back under "normal"."""
    script = textwrap.dedent(
        """
        import os, threading
        from aether.node.runner import set_cpu_scheduling

        def policy_in_new_thread():
            out = []
            t = threading.Thread(target=lambda: out.append(os.sched_getscheduler(0)))
            t.start(); t.join()
            return out[0]

        go = threading.Event()
        early = threading.Thread(target=go.wait)
        early.start()
        assert set_cpu_scheduling("batch") is None
        assert os.sched_getscheduler(early.native_id) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == os.SCHED_BATCH
        assert policy_in_new_thread() == os.SCHED_BATCH
        assert set_cpu_scheduling("normal") is None
        assert os.sched_getscheduler(early.native_id) == os.SCHED_OTHER
        assert policy_in_new_thread() == os.SCHED_OTHER
        go.set(); early.join()
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@needs_sched
def test_a_policy_chosen_by_whoever_started_the_node_is_left_as_it_is() -> None:
    """A node started under another policy (here ``SCHED_IDLE``, as ``chrt --idle`` would) keeps
    it: the answer says so (the node logs it)."""
    script = textwrap.dedent(
        """
        import os
        from aether.node.runner import set_cpu_scheduling

        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        print(set_cpu_scheduling("batch"))
        assert os.sched_getscheduler(0) == os.SCHED_IDLE
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "it runs under SCHED_IDLE, left as it is"


@needs_sched
def test_set_cpu_scheduling_says_why_not_where_the_system_has_no_such_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aether.node import runner

    monkeypatch.delattr(os, "SCHED_BATCH")
    assert runner.set_cpu_scheduling("batch") == "this system has no batch scheduling policy"


@needs_sched
@pytest.mark.parametrize(
    ("args", "expected"), [((), "SCHED_BATCH"), (("--cpu-scheduling", "normal"), "SCHED_OTHER")]
)
def test_a_node_process_runs_every_thread_under_its_policy(
    make_process_cluster: Callable[..., Any], args: tuple[str, ...], expected: str
) -> None:
    """A real `aether node`: every thread (its loop, the executor's, the slice loops') under
    SCHED_BATCH by default, SCHED_OTHER with ``--cpu-scheduling normal``."""
    env = {k: v for k, v in os.environ.items() if k != "AETHER_CPU_SCHEDULING"}
    cluster = make_process_cluster(1, extra_args=list(args), env=env)
    pid = cluster.pid(0)
    assert pid is not None
    policies = _policies(pid)
    assert len(policies) >= 2  # the node's loop and at least one more thread
    assert set(policies.values()) == {getattr(os, expected)}, policies
