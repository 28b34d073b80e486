"""Node logs (docs/operations.md, *Logs*): the JSON line format and the context every record carries,
the bounded buffer of recent records, `GET /api/v1/logs` and its stream, and `aether logs`
(merging several nodes by time, following them) — in-process servers only, and one in-process
cluster for a request that crosses two nodes."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextvars import copy_context
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from click.testing import CliRunner

from aether.api.server import ManagementServer
from aether.cli.client import ManagementClient
from aether.cli.logs import follow_streams, format_entry, merge
from aether.cli.main import main
from aether.core.config import NodeConfig
from aether.core.context import current_instance, current_node_id, current_request_id, current_slice
from aether.core.errors import ConfigError
from aether.core.logs import JsonFormatter, LogBuffer, matches_slice, parse_since
from aether.core.status import MemberStatus, NodeStatus
from aether.core.types import Address, PeerSpec

pytestmark = pytest.mark.timeout(60)

LOGGER = "aether.test.logs"


def _record(msg: str, *, name: str = LOGGER, level: int = logging.INFO, **extra: Any) -> logging.LogRecord:
    r = logging.LogRecord(name, level, __file__, 1, msg, (), None)
    r.__dict__.update(extra)
    return r


def _in(node: str | None = None, rid: str | None = None, slice_: str | None = None,
        instance: int | None = None, fn: Any = None) -> Any:  # fmt: skip
    """Run `fn` in a context with these context variables set (as the node and runtime set them)."""
    ctx = copy_context()

    def run() -> Any:
        current_node_id.set(node)
        current_request_id.set(rid)
        current_slice.set(slice_)
        current_instance.set(instance)
        return fn()

    return ctx.run(run)


# -- the JSON format -----------------------------------------------------------------------------


def test_json_lines_carry_node_request_slice_and_instance() -> None:
    fmt = JsonFormatter("node-9")
    line = _in("node-2", "rid-1", "org.demo:place-order:0.1.0", 3, lambda: fmt.format(_record("placed 7")))
    doc = json.loads(line)
    assert doc == {
        "time": doc["time"], "level": "INFO", "logger": LOGGER, "message": "placed 7", "node": "node-2",
        "request_id": "rid-1", "slice": "org.demo:place-order:0.1.0", "instance": 3,
    }  # fmt: skip
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    # outside any context: the process's node, and no request, slice or instance fields at all
    plain = json.loads(fmt.format(_record("plain")))
    assert plain == {
        "time": plain["time"],
        "level": "INFO",
        "logger": LOGGER,
        "message": "plain",
        "node": "node-9",
    }
    assert "\n" not in fmt.format(_record("two\nlines"))  # one record, one line


def test_json_lines_carry_the_traceback_and_forwarded_fields() -> None:
    fmt = JsonFormatter("node-1")
    try:
        raise ValueError("bad")
    except ValueError:
        r = logging.LogRecord(LOGGER, logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    doc = json.loads(fmt.format(r))
    assert doc["level"] == "ERROR" and "ValueError: bad" in doc["exc"]
    # a record a slice worker process sent: its fields come as attributes
    w = _record("from a worker", aether_node="node-3", aether_slice="g:a:1", aether_instance=2,
                aether_request_id="r-9")  # fmt: skip
    doc = json.loads(fmt.format(w))
    assert (doc["node"], doc["slice"], doc["instance"], doc["request_id"]) == ("node-3", "g:a:1", 2, "r-9")


def test_the_trace_id_is_the_current_trace_contexts() -> None:
    from aether.core.tracing import TraceContext, current_trace

    fmt = JsonFormatter("node-1")
    assert "trace_id" not in json.loads(fmt.format(_record("x")))  # outside a traced call

    def emit() -> str:
        current_trace.set(TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
        return fmt.format(_record("traced"))

    assert json.loads(copy_context().run(emit))["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_log_format_is_a_node_setting() -> None:
    peers = [PeerSpec("node-1", Address("127.0.0.1", 7000))]
    assert NodeConfig(node_id="node-1", peers=peers).log_format == "text"
    assert NodeConfig(node_id="node-1", peers=peers, log_format="json").validate().log_format == "json"
    with pytest.raises(ConfigError, match="log_format must be text or json"):
        NodeConfig(node_id="node-1", peers=peers, log_format="xml").validate()
    with pytest.raises(ConfigError, match="log_buffer"):
        NodeConfig(node_id="node-1", peers=peers, log_buffer=0).validate()


def test_aether_node_log_format_json_writes_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """`aether node --log-format json` sets up stderr with the JSON formatter (the node itself is
    not started: run_node is replaced)."""
    import aether.node.runner as runner

    seen: dict[str, Any] = {}

    def fake_run(config: NodeConfig, **_: Any) -> int:
        root = logging.getLogger()
        seen["formatters"] = [type(h.formatter).__name__ for h in root.handlers]
        seen["format"] = config.log_format
        return 0

    monkeypatch.setattr(runner, "run_node", fake_run)
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = []
    try:
        r = CliRunner().invoke(
            main, ["node", "--log-format", "json", "--fsync", "none"], catch_exceptions=False
        )
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    assert r.exit_code == 0, r.output
    assert seen == {"formatters": ["JsonFormatter"], "format": "json"}


# -- the buffer ----------------------------------------------------------------------------------


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger(LOGGER)
    old = log.level, log.propagate
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        yield log
    finally:
        log.setLevel(old[0])
        log.propagate = old[1]
        log.handlers[:] = []


def test_buffer_keeps_the_newest_records_within_its_bounds(logger: logging.Logger) -> None:
    buf = LogBuffer("node-1", max_records=3, claim_all=True)
    buf.attach(logger)
    for i in range(5):
        logger.info("m%d", i)
    assert [e.message for e in buf.query()] == ["m2", "m3", "m4"]
    assert (buf.first_seq, buf.last_seq, buf.evicted, len(buf)) == (3, 5, 2, 3)
    # the byte bound: big records push the old ones out, one record always stays
    small = LogBuffer("node-1", max_bytes=2000, claim_all=True)
    small.attach(logger)
    for i in range(10):
        logger.info("%d%s", i, "x" * 500)
    assert small.size <= 2000 and len(small) == 2
    assert small.query()[-1].message.startswith("9")
    logger.info("y" * 5000)
    assert len(small) == 1 and small.query()[0].message == "y" * 5000


def test_buffer_keeps_only_its_own_nodes_records(logger: logging.Logger) -> None:
    mine, other = LogBuffer("node-1"), LogBuffer("node-2")
    mine.attach(logger)
    other.attach(logger)
    _in("node-1", fn=lambda: logger.info("in node-1's context"))
    _in("node-2", fn=lambda: logger.info("in node-2's context"))
    logging.getLogger(f"{LOGGER}.node-1").info("named after node-1, no context")
    logger.info("nobody's")
    assert [e.message for e in mine.query()] == ["in node-1's context", "named after node-1, no context"]
    assert [e.message for e in other.query()] == ["in node-2's context"]
    assert {e.node for e in mine.query()} == {"node-1"}


def test_buffer_queries_filter_by_time_level_slice_sequence_and_limit(logger: logging.Logger) -> None:
    buf = LogBuffer("node-1", claim_all=True)
    buf.attach(logger)
    logger.debug("debug")
    _in("node-1", "r1", "org.demo:place-order:0.1.0", 1, lambda: logger.info("placed"))
    _in("node-1", "r2", "org.demo:inventory:0.2.0", 2, lambda: logger.warning("low stock"))
    logger.error("broken")
    msgs = lambda **kw: [e.message for e in buf.query(**kw)]  # noqa: E731
    assert msgs() == ["debug", "placed", "low stock", "broken"]
    assert msgs(level=logging.WARNING) == ["low stock", "broken"]
    assert msgs(slice="org.demo:place-order") == ["placed"]
    assert msgs(slice="org.demo:inventory:0.2.0") == ["low stock"]
    assert msgs(slice="inventory") == ["low stock"]
    assert msgs(slice="org.demo:inventory:9.9.9") == []
    assert msgs(after=2) == ["low stock", "broken"]
    assert msgs(limit=2) == ["low stock", "broken"]
    assert msgs(since=time.time() + 60) == []
    assert msgs(since=time.time() - 60) == msgs()
    placed = buf.query(slice="place-order")[0]
    assert (placed.request_id, placed.instance, placed.node) == ("r1", 1, "node-1")


def test_since_slice_matching() -> None:
    now = 1_800_000_000.0
    assert parse_since("5m", now) == now - 300
    assert parse_since("300", now) == now - 300
    assert parse_since("1.5h", now) == now - 5400
    assert parse_since("1700000000", now) == 1_700_000_000
    assert parse_since("2023-11-14T22:13:20Z", now) == 1_700_000_000
    assert parse_since("2023-11-14T22:13:20", now) == 1_700_000_000
    with pytest.raises(ValueError, match="duration"):
        parse_since("yesterday", now)
    assert (
        matches_slice("g:a:1.0", "g:a")
        and matches_slice("g:a:1.0", "a")
        and matches_slice("g:a:1.0", "g:a:1.0")
    )
    assert not matches_slice("g:ab:1.0", "g:a") and not matches_slice(None, "a")


# -- the API, on in-process management servers -----------------------------------------------------


class LogNode:
    """What the management API needs of a node for the log endpoints (and `aether logs` to find
    the members): an id, a status, a log buffer."""

    def __init__(self, node_id: str, logger: logging.Logger) -> None:
        self.node_id = node_id
        self.management_port = 0
        self.published: dict[str, str] = {}  # node id -> the management address it published
        self.logs = LogBuffer(node_id)
        self.logs.attach(logger)

    def status(self) -> NodeStatus:
        return NodeStatus(
            node_id=self.node_id, leader="node-1", quorum=True, management_port=self.management_port,
            nodes=[MemberStatus("node-1", "127.0.0.1:7000", "up", self.published.get("node-1")),
                   MemberStatus("node-2", "127.0.0.1:7001", "up", self.published.get("node-2"))],
        )  # fmt: skip

    def kv_list(self, prefix: str) -> list[Any]:
        return []


@pytest.fixture
def servers(logger: logging.Logger) -> Iterator[list[tuple[LogNode, ManagementServer]]]:
    """Two nodes' management servers on a loop in a background thread (the CLI client blocks)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    out = []
    for node_id in ("node-1", "node-2"):
        node = LogNode(node_id, logger)
        srv = ManagementServer(node, host="127.0.0.1", port=0, heartbeat=1.0)
        asyncio.run_coroutine_threadsafe(srv.start(), loop).result(10)
        node.management_port = srv.port
        out.append((node, srv))
    try:
        yield out
    finally:
        for _, srv in out:
            asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _get(srv: ManagementServer, path: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_get_logs_answers_the_filtered_records(servers: list[Any], logger: logging.Logger) -> None:
    (_, srv), _ = servers
    _in("node-1", "r1", "org.demo:place-order:0.1.0", 1, lambda: logger.info("placed"))
    _in("node-1", fn=lambda: logger.warning("slow disk"))
    _in("node-2", fn=lambda: logger.warning("not node-1's"))
    status, page = _get(srv, "/api/v1/logs")
    assert status == 200
    assert page["node_id"] == "node-1" and page["last_seq"] == 2
    assert [(e["seq"], e["message"]) for e in page["entries"]] == [(1, "placed"), (2, "slow disk")]
    assert page["entries"][0]["request_id"] == "r1" and page["entries"][0]["instance"] == 1
    assert [e["message"] for e in _get(srv, "/api/v1/logs?level=warning")[1]["entries"]] == ["slow disk"]
    assert [e["message"] for e in _get(srv, "/api/v1/logs?slice=place-order&since=5m")[1]["entries"]] == [
        "placed"
    ]
    assert [e["message"] for e in _get(srv, "/api/v1/logs?after=1")[1]["entries"]] == ["slow disk"]
    assert [e["message"] for e in _get(srv, "/api/v1/logs?limit=1")[1]["entries"]] == ["slow disk"]
    for bad, says in (("since=soon", "since"), ("level=loud", "level"), ("limit=0", "limit"),
                      ("after=x", "after"), ("colour=red", "colour")):  # fmt: skip
        status, problem = _get(srv, f"/api/v1/logs?{bad}")
        assert status == 400 and says in problem["detail"], (bad, problem)


async def test_the_log_stream_sends_new_records_as_events(servers: list[Any], logger: logging.Logger) -> None:
    (_, srv), _ = servers
    _in("node-1", fn=lambda: logger.info("before the stream"))
    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{srv.port}/api/v1/logs/stream?level=info"
        async with s.get(url) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            hello = await r.content.readuntil(b"\n\n")
            assert b"event: hello" in hello and b'"last_seq":1' in hello
            _in("node-1", "r7", fn=lambda: logger.debug("too low"))
            _in("node-1", "r7", fn=lambda: logger.info("after the stream opened"))
            block = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
    lines = dict(line.split(": ", 1) for line in block.decode().strip().splitlines())
    assert lines["event"] == "log" and lines["id"] == "3"
    data = json.loads(lines["data"])
    assert (data["message"], data["request_id"], data["node"]) == ("after the stream opened", "r7", "node-1")


async def test_the_log_stream_says_when_records_left_the_buffer_unsent(
    servers: list[Any], logger: logging.Logger
) -> None:
    (n1, srv), _ = servers
    n1.logs.max_records = 2
    url = f"http://127.0.0.1:{srv.port}/api/v1/logs/stream"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        await r.content.readuntil(b"\n\n")  # hello
        for i in range(5):  # faster than the stream looks (every 0.2 s): some never get sent
            _in("node-1", fn=lambda i=i: logger.info("burst %d", i))
        blocks = [await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)]
        while b"burst 4" not in blocks[-1]:
            assert len(blocks) < 8, blocks  # (keepalives come every second: fail fast, not at the timeout)
            blocks.append(await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5))
    gaps = [json.loads(b.split(b"data: ", 1)[1]) for b in blocks if b.startswith(b"event: gap")]
    sent = [json.loads(b.split(b"data: ", 1)[1])["message"] for b in blocks if b"event: log" in b]
    assert gaps and sum(g["missed"] for g in gaps) + len(sent) == 5, blocks
    assert sent[-2:] == ["burst 3", "burst 4"]


# -- aether logs ----------------------------------------------------------------------------------


def _cli(*args: str) -> Any:
    env = {"AETHER_CONNECT": None, "AETHER_API_KEY": None, "COLUMNS": "200"}
    return CliRunner(env=env).invoke(main, list(args), catch_exceptions=False)


def test_aether_logs_merges_the_nodes_by_time(
    servers: list[Any], logger: logging.Logger, tmp_path: Path
) -> None:
    (_, s1), (_, s2) = servers
    _in("node-1", "req-42", fn=lambda: logger.info("router took the request"))
    _in("node-2", "req-42", "org.demo:place-order:0.1.0", 0, lambda: logger.info("order placed"))
    _in("node-1", "req-42", fn=lambda: logger.info("router answered"))
    _in("node-2", fn=lambda: logger.error("unrelated"))
    # by node id: node-1 is the --connect node, node-2 found from the member list (its host, our port)
    r = _cli("--connect", f"127.0.0.1:{s1.port}", "logs", "node-1", "--dir", str(tmp_path))
    assert r.exit_code == 0, r.output
    assert [line.split(": ", 1)[1] for line in r.stdout.splitlines()] == [
        "router took the request",
        "router answered",
    ]
    r = _cli("logs", f"127.0.0.1:{s1.port}", f"127.0.0.1:{s2.port}", "--since", "5m")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "router took the request",
        "order placed",
        "router answered",
        "unrelated",
    ]
    assert " node-1 INFO    [req-42] " in lines[0]
    assert " node-2 INFO    [req-42] org.demo:place-order:0.1.0#0 aether.test.logs: order placed" in lines[1]
    assert " node-2 ERROR   [-] " in lines[3]
    r = _cli("--json", "logs", f"127.0.0.1:{s1.port}", f"127.0.0.1:{s2.port}", "--slice", "place-order")
    assert [json.loads(line)["node"] for line in r.stdout.splitlines()] == ["node-2"]
    # node-2's address is guessed (its cluster host, node-1's management port): node-1 answers there
    r = _cli("--connect", f"127.0.0.1:{s1.port}", "logs", "node-2", "--dir", str(tmp_path))
    assert r.exit_code == 0 and "but node-1 answered" in r.stderr and "HOST:PORT" in r.stderr
    # a local cluster's cluster.json knows the management port of each node
    from aether.cli.local_cluster import ClusterRecord, NodeRecord, save_record

    nodes = [NodeRecord(id=f"node-{i}", cluster_port=7000 + i, management_port=s.port, http_port=0,
                        data_dir="d", log="l", pid_file="p") for i, s in ((1, s1), (2, s2))]  # fmt: skip
    save_record(tmp_path, ClusterRecord(host="127.0.0.1", port_offset=0, nodes=nodes))
    r = _cli("--connect", f"127.0.0.1:{s1.port}", "logs", "node-2", "--dir", str(tmp_path))
    assert r.exit_code == 0 and "answered" not in r.stderr, r.stderr
    assert [line.split(": ", 1)[1] for line in r.stdout.splitlines()] == ["order placed", "unrelated"]
    r = _cli("--connect", f"127.0.0.1:{s1.port}", "logs", "node-7", "--dir", str(tmp_path))
    assert r.exit_code == 2 and "no node 'node-7'" in r.stderr and "node-1, node-2" in r.stderr
    # the address a node published (nodes/{id}, shown by GET /api/v1/nodes) wins over both
    n1, _ = servers[0]
    n1.published["node-2"] = f"127.0.0.1:{s2.port}"
    (tmp_path / "cluster.json").unlink()
    r = _cli("--connect", f"127.0.0.1:{s1.port}", "logs", "node-2", "--dir", str(tmp_path))
    assert r.exit_code == 0 and "answered" not in r.stderr, r.stderr
    assert [line.split(": ", 1)[1] for line in r.stdout.splitlines()] == ["order placed", "unrelated"]
    assert _cli("logs", f"127.0.0.1:{s1.port}", "--since", "soon").exit_code == 2


def test_aether_logs_follow_shows_one_requests_lines_from_two_nodes(
    servers: list[Any], logger: logging.Logger
) -> None:
    (_, s1), (_, s2) = servers
    clients = [ManagementClient(f"127.0.0.1:{s.port}") for s in (s1, s2)]
    got: list[dict[str, Any]] = []
    notices: list[str] = []
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_streams, args=(clients, {}, got.append, notices.append, stop), kwargs={"window": 0.1}
    )
    follower.start()
    try:
        deadline = time.monotonic() + 10
        while sum("following" in n for n in notices) < 2:
            assert time.monotonic() < deadline, notices
            time.sleep(0.02)
        _in("node-1", "req-7", fn=lambda: logger.info("router: POST /orders"))
        _in("node-2", "req-7", "org.demo:place-order:0.1.0", 1, lambda: logger.info("placing the order"))
        _in("node-1", "req-8", fn=lambda: logger.info("another request"))
        while len(got) < 3:
            assert time.monotonic() < deadline, got
            time.sleep(0.02)
    finally:
        stop.set()
        follower.join(5)
    mine = [e for e in got if e.get("request_id") == "req-7"]
    assert [(e["node"], e["message"]) for e in mine] == [
        ("node-1", "router: POST /orders"),
        ("node-2", "placing the order"),
    ]
    assert all("[req-7]" in format_entry(e) for e in mine)
    assert merge([[got[2]], got[:2]]) == got  # by time, whichever node's page they came in


# -- a request across two nodes of an in-process cluster ------------------------------------------

ECHO = """
from aether.slices import Slice, route


class Echo(Slice):
    async def start(self) -> None:
        self.logger.info("echo starting")

    @route("GET", "/echo/{word}")
    async def echo(self, word: str) -> str:
        self.logger.info("echoing %s", word)
        return word
"""


@pytest.mark.timeout(90)
async def test_one_request_through_the_router_logs_on_two_nodes_with_one_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from aether.core.artifact import Artifact
    from conftest import running_cluster

    caplog.set_level(logging.DEBUG, logger="aether.invoke")
    caplog.set_level(logging.INFO, logger="aether.slice")
    async with running_cluster(tmp_path, extra={"org.test:echo:0.1.0": (ECHO, "Echo")}) as nodes:
        await nodes[0].deployments.deploy(Artifact.parse("org.test:echo:0.1.0"), 1)
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while not (hosts := [n for n in nodes if n.slice_runtime.instance_loads()]):
            assert loop.time() < end, "echo never became ACTIVE"
            await asyncio.sleep(0.05)
        host = hosts[0]
        caller = next(n for n in nodes if n is not host)
        # `aether logs --follow` on both nodes while the request goes through
        clients = [ManagementClient(f"127.0.0.1:{n.management.port}") for n in (caller, host)]
        got: list[dict[str, Any]] = []
        notices: list[str] = []
        stop = threading.Event()
        follower = threading.Thread(
            target=follow_streams, args=(clients, {}, got.append, notices.append, stop), kwargs={"window": 0}
        )
        follower.start()
        try:
            while sum("following" in n for n in notices) < 2:
                assert loop.time() < end, notices
                await asyncio.sleep(0.02)
            url = f"http://127.0.0.1:{caller.http.port}/echo/hi"
            async with aiohttp.ClientSession() as s:
                while True:
                    async with s.get(url, headers={"X-Request-Id": "req-cross-1"}) as r:
                        if r.status == 200:
                            break
                    assert loop.time() < end, f"the route never answered: {r.status}"
                    await asyncio.sleep(0.05)
            def lines() -> list[str]:
                return [format_entry(e) for e in list(got) if e.get("request_id") == "req-cross-1"]

            def slice_line() -> bool:  # the slice's own record on its host
                mark = f" {host.node_id} INFO    [req-cross-1] org.test:echo:0.1.0#"
                return any(mark in x for x in lines())

            def caller_line() -> bool:  # the router's node handing the call on
                return any(f" {caller.node_id} DEBUG   [req-cross-1] " in x for x in lines())

            # the two nodes' streams arrive in any order: wait for both records, not any two
            while not (slice_line() and caller_line()):
                assert loop.time() < end, lines()
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.to_thread(follower.join, 5)
        assert slice_line() and caller_line(), lines()
        on_caller = caller.logs.query()
        on_host = host.logs.query()
        assert any(e.request_id == "req-cross-1" and e.node == caller.node_id for e in on_caller), on_caller
        echoed = [e for e in on_host if e.message == "echoing hi" and e.request_id == "req-cross-1"]
        assert echoed, on_host
        assert echoed[0].node == host.node_id
        assert echoed[0].slice == "org.test:echo:0.1.0" and echoed[0].instance is not None
        # what the instance's start() logged names it too
        started = [e for e in on_host if e.message == "echo starting"]
        assert [(e.slice, e.instance) for e in started] == [("org.test:echo:0.1.0", echoed[0].instance)]
        # every node keeps only its own records
        assert all(e.node == caller.node_id for e in on_caller)
        # and the API hands them out
        status, page = await asyncio.to_thread(
            lambda: _get_port(host.management.port, "/api/v1/logs?slice=echo")
        )
        assert status == 200 and [e["message"] for e in page["entries"]] == ["echo starting", "echoing hi"]


def _get_port(port: int, path: str) -> tuple[int, Any]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, msgspec.json.decode(r.read())
