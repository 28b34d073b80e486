"""Prometheus exposition of the cluster series (issue 18.3), the naming conventions (`promtool
check metrics`), and the Grafana dashboard in docs/grafana/aether.json: every query of its panels
returns data from a real Prometheus (Debian's, `make prometheus`) scraping a 3-node cluster.

The promtool and Prometheus tests skip with the reason when the binaries are missing.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aether.cluster.leader import LeaderManager
from aether.core.histogram import Histogram
from aether.metrics import ClusterFigures, MapFigures
from aether.metrics.prometheus import PrometheusExporter
from test_metrics import HELLO, _InstanceSource, inst

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "aether.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


# --- the histogram ---------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_with_an_inf_bucket() -> None:
    h = Histogram((0.01, 0.1))
    for v in (0.005, 0.01, 0.05, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.01, 2), (0.1, 3), (float("inf"), 4)]
    assert h.count == 4 and h.sum == pytest.approx(3.065)
    with pytest.raises(ValueError, match="increasing"):
        Histogram((0.1, 0.1))
    with pytest.raises(ValueError, match="non-empty"):
        Histogram(())


def test_leader_manager_counts_leader_changes() -> None:
    lm = LeaderManager("b", ["a", "b", "c"])
    assert lm.leader is None and lm.changes == 0
    lm.peer_up("c")  # b and c: a quorum, b leads
    lm.peer_up("a")  # a leads
    lm.peer_up("a")  # no change
    lm.peer_down("a")
    lm.peer_down("c")  # no quorum: no leader
    assert lm.leader is None and lm.changes == 4


# --- the cluster series -----------------------------------------------------------------------------


def figures() -> ClusterFigures:
    h = Histogram()
    for v in (0.002, 0.003, 0.2):
        h.observe(v)
    return ClusterFigures(
        members=3, reachable_members=2, quorum=True, is_leader=True, leader_changes=2, slots=40,
        null_slots=5, commands=70, applied_slot=41, commit_buckets=h.cumulative(), commit_seconds=h.sum,
        slices={"ACTIVE": 2, "FAILED": 1, "LOADING": 0}, routes=4,
        maps=[MapFigures("carts", 10, 2048, 3, 6, 1, 2, 0.25,
                         {"timeout": 4, "refused": 1, "unreachable": 0})],
        invoke={"calls": 9, "succeeded": 7, "failed": 2, "attempts": 11, "local_attempts": 8,
                "remote_attempts": 3, "retries": 2, "indeterminate": 1, "skipped_open": 0},
    )  # fmt: skip


class _ClusterSource(_InstanceSource):
    def __init__(self, node_id: str, fig: ClusterFigures | None) -> None:
        super().__init__(node_id, [inst(0, 9, 5, 0.1)])
        self.fig = fig
        for seconds, ok in ((0.01, True), (0.01, True), (0.2, False)):  # 3 calls, every counter differs
            self.entries.record(HELLO, "greet", seconds, ok)

    def cluster_figures(self) -> ClusterFigures | None:
        return self.fig


def full_exposition() -> str:
    return PrometheusExporter(_ClusterSource("n1", figures())).render().decode()


def test_cluster_series_come_from_the_figures() -> None:
    fams = {f.name: f for f in text_string_to_metric_families(full_exposition())}

    def one(name: str) -> float:
        (s,) = fams[name].samples
        assert s.labels == {"node": "n1"}, name
        return s.value

    assert (one("aether_cluster_members"), one("aether_cluster_reachable_members")) == (3, 2)
    assert (one("aether_cluster_quorum"), one("aether_cluster_leader")) == (1, 1)
    assert (one("aether_consensus_applied_slot"), one("aether_http_routes")) == (41, 4)
    assert one("aether_cluster_leader_changes") == 2
    assert fams["aether_cluster_leader_changes"].type == "counter"
    assert (one("aether_consensus_slots"), one("aether_consensus_null_slots")) == (40, 5)
    assert one("aether_consensus_commands") == 70
    hist = fams["aether_consensus_commit_latency_seconds"]
    commit = {(s.name, s.labels.get("le")): s.value for s in hist.samples}
    assert commit[("aether_consensus_commit_latency_seconds_bucket", "0.0025")] == 1
    assert commit[("aether_consensus_commit_latency_seconds_bucket", "+Inf")] == 3
    assert commit[("aether_consensus_commit_latency_seconds_count", None)] == 3
    assert commit[("aether_consensus_commit_latency_seconds_sum", None)] == pytest.approx(0.205)
    assert {s.labels["state"]: s.value for s in fams["aether_slices"].samples} == {
        "ACTIVE": 2, "FAILED": 1, "LOADING": 0,
    }  # fmt: skip
    parts = {s.labels["role"]: s.value for s in fams["aether_map_partitions"].samples}
    assert parts == {"primary": 3, "replica": 6, "syncing": 1}
    assert fams["aether_map_entries"].samples[0].labels == {"node": "n1", "map": "carts"}
    assert fams["aether_map_storage_bytes"].samples[0].value == 2048
    assert fams["aether_map_replication_pending_acks"].samples[0].value == 2
    assert fams["aether_map_replication_lag_seconds"].samples[0].value == 0.25
    retries = {s.labels["reason"]: s.value for s in fams["aether_map_op_retries"].samples}
    assert retries == {"timeout": 4, "refused": 1, "unreachable": 0}
    assert fams["aether_map_op_retries"].type == "counter"
    assert fams["aether_map_op_retries"].samples[0].labels["map"] == "carts"
    calls = {s.labels["outcome"]: s.value for s in fams["aether_invoke_calls"].samples}
    assert calls == {"succeeded": 7, "failed": 2} and fams["aether_invoke_calls"].type == "counter"
    attempts = {s.labels["where"]: s.value for s in fams["aether_invoke_attempts"].samples}
    assert attempts == {"local": 8, "remote": 3}
    assert (one("aether_invoke_retries"), one("aether_invoke_indeterminate")) == (2, 1)
    # no figures (a source without them, or reading them failed): no cluster series
    names = {f.name for f in text_string_to_metric_families(
        PrometheusExporter(_ClusterSource("n2", None)).render().decode())}  # fmt: skip
    assert "aether_cluster_members" not in names and "aether_node_cpu_ratio" in names


def test_series_follow_the_naming_conventions() -> None:
    """Base units, no percentages or milliseconds, and no counter repeating a histogram's _count
    (the promtool lint below does not check the last)."""
    fams = list(text_string_to_metric_families(full_exposition()))
    names = {f.name for f in fams}
    assert not [n for n in names if re.search(r"_(percent|ms|milliseconds|kb|mb)(_|$)", n)]
    counters = {f.name: f for f in fams if f.type == "counter"}
    for h in (f for f in fams if f.type == "histogram"):
        counts = {tuple(sorted(s.labels.items())): s.value for s in h.samples if s.name.endswith("_count")}
        for c in counters.values():
            values = {tuple(sorted(s.labels.items())): s.value for s in c.samples}
            assert values != counts, f"{c.name}_total repeats {h.name}_count"


MISSING = "missing (Debian package prometheus: `make prometheus` installs it)"


@pytest.mark.skipif(PROMTOOL is None, reason=f"promtool {MISSING}")
def test_promtool_check_metrics_passes() -> None:
    assert PROMTOOL is not None
    bad = "# HELP x_calls Calls\n# TYPE x_calls counter\nx_calls 1\n"  # the lint does bite
    lint = [PROMTOOL, "check", "metrics"]
    assert subprocess.run(lint, input=bad, text=True, capture_output=True, timeout=30).returncode
    done = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=full_exposition(), text=True, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the dashboard ----------------------------------------------------------------------------------


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    d = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in d["panels"] for t in p.get("targets", [])]


def test_dashboard_is_well_formed_and_covers_every_series() -> None:
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert d["templating"]["list"][0]["type"] == "datasource"
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
    exprs = " ".join(e for _, e in dashboard_queries())
    fams = text_string_to_metric_families(full_exposition())
    families = {f.name for f in fams if f.name.startswith("aether_")}
    missing = sorted(f for f in families if not re.search(rf"\b{f}(_total|_bucket|_count)?\b", exprs))
    assert not missing, f"series without a dashboard panel: {missing}"


# --- a real Prometheus scraping a 3-node cluster ------------------------------------------------------

BLUEPRINT = """
id = "hello:1"
[slices.hello]
artifact = "org.example:hello:0.1.0"
instances = 3
"""


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason=f"prometheus {MISSING}")
async def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    from aether.core.maps import MapSpec
    from conftest import free_ports, running_cluster

    assert PROMETHEUS is not None
    key = "prom-test-key"
    async with running_cluster(tmp_path, api_key=key) as nodes:
        n1 = nodes[0]
        await n1.deployments.apply_blueprint(BLUEPRINT, "hello.toml")
        await n1.deployments.wait_converged("hello:1", timeout=30)
        await n1.maps.define("carts", MapSpec(replicas=2, write_quorum=2))
        (port,) = free_ports(1)
        targets = [f"127.0.0.1:{n.management.port}" for n in nodes]
        config = tmp_path / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{
                "job_name": "aether", "authorization": {"credentials": key},
                "static_configs": [{"targets": targets}],
            }],
        }))  # fmt: skip
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            api = f"http://127.0.0.1:{port}/api/v1"
            loop = asyncio.get_running_loop()
            http = [n.http.port for n in nodes]

            async def traffic() -> None:  # calls on every node, writes to the log and the map
                i = 0
                while True:
                    i += 1
                    url = f"http://127.0.0.1:{http[i % 3]}/hello/n{i}"
                    await asyncio.to_thread(lambda u=url: urllib.request.urlopen(u, timeout=5).read())
                    await n1.kv.put(f"user/prom/{i % 5}", b"%d" % i)
                    await nodes[i % 3].maps.map_put("carts", f"k{i % 7}", b"v")
                    await asyncio.sleep(0.05)

            load = asyncio.create_task(traffic())
            queries = dashboard_queries()
            empty: list[tuple[str, str]] = queries
            end = loop.time() + 25
            try:
                while empty and loop.time() < end:
                    await asyncio.sleep(1)
                    assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
                    up = await asyncio.to_thread(_get, f"{api}/query?query=up")
                    if sum(float(r["value"][1]) for r in up["data"]["result"]) < 3:
                        continue  # not every target scraped yet
                    still = []
                    for title, expr in empty:
                        q = urllib.parse.urlencode({"query": expr})
                        res = await asyncio.to_thread(_get, f"{api}/query?{q}")
                        assert res["status"] == "success", (title, expr, res)
                        if not res["data"]["result"]:
                            still.append((title, expr))
                    empty = still
            finally:
                load.cancel()
                (stopped,) = await asyncio.gather(load, return_exceptions=True)
                assert isinstance(stopped, asyncio.CancelledError), f"the traffic failed: {stopped!r}"
            assert not empty, f"dashboard queries without data: {empty}"
            targets_now = await asyncio.to_thread(_get, f"{api}/targets")
            health = {t["scrapeUrl"]: t["health"] for t in targets_now["data"]["activeTargets"]}
            assert set(health.values()) == {"up"}, health
            # the figures are the components' own: commits were timed, commands counted
            commits = await asyncio.to_thread(
                _get, f"{api}/query?query=sum(aether_consensus_commit_latency_seconds_count)"
            )
            assert float(commits["data"]["result"][0]["value"][1]) > 0
            leaders = await asyncio.to_thread(_get, f"{api}/query?query=sum(aether_cluster_leader)")
            assert float(leaders["data"]["result"][0]["value"][1]) == 1
            assert all(n.runner.engine.stats["commands"] > 0 for n in nodes)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()


# --- the node's figures (in process, no Prometheus needed) ---------------------------------------------


async def test_a_node_reports_its_view_of_the_cluster(tmp_path: Path) -> None:
    import aiohttp

    from aether.core.maps import MapSpec
    from conftest import running_cluster

    async with running_cluster(tmp_path, api_key="k") as nodes:
        n1, n2, _ = nodes
        await n1.maps.define("carts", MapSpec(replicas=2, write_quorum=2))
        await n2.maps.map_put("carts", "k", b"v")  # waits for the partition table
        before = n2.metrics.cluster_figures()
        assert before is not None
        for i in range(3):
            await n2.kv.put(f"user/figures/{i}", b"x")  # committed through n2's runner
        figs = [n.metrics.cluster_figures() for n in nodes]
        assert all(f is not None for f in figs)
        f2 = figs[1]
        assert f2 is not None
        assert (f2.members, f2.reachable_members, f2.quorum) == (3, 3, True)
        assert [f.is_leader for f in figs if f is not None] == [True, False, False]  # node-1 leads
        assert f2.leader_changes >= 1  # from none to node-1
        # n2 also writes on its own (map health...): at least our three
        assert f2.commit_buckets[-1][1] >= before.commit_buckets[-1][1] + 3 and f2.commit_seconds > 0
        assert f2.commands >= before.commands + 3 and f2.slots > 0
        assert f2.applied_slot == n2.runner.engine.applied
        assert f2.slices == {"LOAD": 0, "LOADING": 0, "LOADED": 0, "ACTIVATE": 0, "ACTIVATING": 0,
                             "ACTIVE": 0, "DEACTIVATE": 0, "DEACTIVATING": 0, "UNLOAD": 0,
                             "UNLOADING": 0, "FAILED": 0}  # fmt: skip
        assert f2.routes == 0
        # every node applies the map's partition table on its own: wait until all have
        # (the nodes also publish the hello wheels of their directory a second or more after the
        # start: the repository's own map `aether.repository` may be there too)
        def carts(f: Any) -> MapFigures:
            (m,) = [m for m in f.maps if m.map == "carts"]
            return m

        def maps_view() -> list[MapFigures]:
            return [carts(f) for n in nodes if (f := n.metrics.cluster_figures()) is not None and f.maps]

        deadline = asyncio.get_running_loop().time() + 10
        while (
            sum(m.primary_partitions for m in maps_view()) != n1.maps.partitions
            or any(m.primary_partitions + m.replica_partitions == 0 for m in maps_view())
            or sum(m.entries for m in maps_view()) < 2  # a new owner may still be syncing the key
        ):
            assert asyncio.get_running_loop().time() < deadline, maps_view()
            await asyncio.sleep(0.05)
        figs = [n.metrics.cluster_figures() for n in nodes]
        m = carts(figs[1])
        assert m.primary_partitions + m.replica_partitions > 0
        total = sum(carts(f).primary_partitions for f in figs if f is not None)
        assert total == n1.maps.partitions  # every partition has one primary
        assert sum(carts(f).entries for f in figs if f is not None) >= 2  # the key on its owners
        # and the scrape serves them (with the API key)
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{n2.management.port}/metrics"
            async with http.get(url) as r:
                assert r.status == 401
            async with http.get(url, headers={"X-API-Key": "k"}) as r:
                assert r.status == 200
                text = await r.text()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        assert fams["aether_cluster_members"].samples[0].labels == {"node": "node-2"}
        assert fams["aether_consensus_commit_latency_seconds"].type == "histogram"
        assert {s.labels["role"] for s in fams["aether_map_partitions"].samples} == {
            "primary", "replica", "syncing",
        }  # fmt: skip
