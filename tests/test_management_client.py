"""The public management-API client (`aether.client.management`), sync and async, against a fake
node's real management server: typed answers, typed errors carrying the status and the problem."""

from __future__ import annotations

import asyncio
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import aether.client
from aether.client.management import (
    ApiError,
    ApiUnreachable,
    AsyncManagementClient,
    ManagementClient,
    ServerEvent,
)
from aether.core.problem import Problem
from aether.core.status import KVEntry, NodeStatus
from aether.deploy.operations import SliceInstanceStatus, SliceStatus
from conftest import refusing_port
from test_cli_ops import FakeNode, Servers, addr

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def servers() -> Iterator[Servers]:
    s = Servers()
    try:
        yield s
    finally:
        s.close()


def test_the_clients_are_public_names_of_aether_client() -> None:
    assert aether.client.ManagementClient is ManagementClient
    assert aether.client.AsyncManagementClient is AsyncManagementClient
    assert aether.client.ApiError is ApiError
    with pytest.raises(AttributeError):
        _ = aether.client.NoSuchName  # type: ignore[attr-defined]


def _node() -> FakeNode:
    node = FakeNode()
    node.slices = [KVEntry("config/a", {"x": 1}), KVEntry("other/b", "y")]
    node.deployments.status = [
        {"artifact": "org.demo:a:1.0", "desired": 2, "active": 1,
         "instances": [{"node": "node-1", "state": "ACTIVE", "reason": None, "instance_ids": [1]}]},
    ]  # fmt: skip
    return node


def test_sync_typed_calls(servers: Servers) -> None:
    srv = servers.start(_node())
    client = ManagementClient(f"http://{addr(srv)}")
    st = client.status()
    assert isinstance(st, NodeStatus) and st.node_id == "node-1" and st.quorum
    assert [m["id"] for m in client.nodes()] == ["node-1", "node-2"]
    assert client.kv("config/") == [KVEntry("config/a", {"x": 1})]
    assert client.slices() == [
        SliceStatus("org.demo:a:1.0", 2, 1, [SliceInstanceStatus("node-1", "ACTIVE", None, [1])])
    ]
    assert client.health()["ready"] is True


def test_errors_carry_status_and_problem(servers: Servers) -> None:
    node = _node()
    node.quorum = False
    srv = servers.start(node)
    client = ManagementClient(addr(srv))
    health = client.health()  # 503 is an answer here, not an error
    assert health["ready"] is False and health["reason"]
    with pytest.raises(ApiError) as caught:
        client.get_json("/api/v1/no-such-thing")
    e = caught.value
    assert e.status == 404 and isinstance(e.problem, Problem) and e.problem.status == 404
    assert e.detail == e.problem.detail and e.kind == e.problem.type and e.body["status"] == 404
    with pytest.raises(ApiError) as caught:
        client.deploy("org.demo:a:1.0", instances=0)  # bad input: a 400 naming the field
    assert caught.value.status == 400 and "instances" in caught.value.detail
    with pytest.raises(ApiUnreachable):
        ManagementClient(f"127.0.0.1:{refusing_port()}", timeout=2).status()


def test_async_typed_calls(servers: Servers) -> None:
    srv = servers.start(_node())

    async def main() -> None:
        client = AsyncManagementClient(f"http://{addr(srv)}")
        st, nodes, slices = await asyncio.gather(client.status(), client.nodes(), client.slices())
        assert isinstance(st, NodeStatus) and st.leader == "node-1"
        assert len(nodes) == 2 and slices[0].artifact == "org.demo:a:1.0"
        assert await client.kv("other/") == [KVEntry("other/b", "y")]
        with pytest.raises(ApiError) as caught:
            await client.get_json("/api/v1/no-such-thing")
        assert caught.value.status == 404
        events = client.events(read_timeout=5)
        first = await anext(events)
        assert isinstance(first, ServerEvent) and first.event == "hello"
        await events.aclose()  # type: ignore[attr-defined]

    asyncio.run(main())


def test_upload_streams_the_file_in_pieces_with_progress(tmp_path: Path) -> None:
    """`upload` PUTs the file's bytes (with its length, the API key and the params) in 256 KiB
    pieces, reporting progress after each; the 2xx answer's body comes back."""
    got: dict[str, object] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            headers = self.headers
            got.update(path=self.path, type=headers["Content-Type"], key=headers["X-API-Key"], body=body)
            answer = b'{"stored": true}'
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        data = os.urandom(600 * 1024)
        wheel = tmp_path / "w.whl"
        wheel.write_bytes(data)
        seen: list[tuple[int, int]] = []
        client = ManagementClient(f"127.0.0.1:{srv.server_address[1]}", api_key="k-1")
        path = "/api/v1/repository/files/w.whl"
        answer = client.upload(path, wheel, {"sha256": "ab"}, lambda *p: seen.append(p))
        assert answer == b'{"stored": true}'
        assert got == {
            "path": f"{path}?sha256=ab",
            "type": "application/octet-stream",
            "key": "k-1",
            "body": data,
        }
        assert seen == [(256 * 1024, len(data)), (512 * 1024, len(data)), (len(data), len(data))]
    finally:
        srv.shutdown()
        srv.server_close()


def test_an_upload_without_an_answer_names_the_uploads_own_timeout(tmp_path: Path) -> None:
    """An upload waits the client's timeout plus 1 s per MiB; with no answer it said "no answer
    within 15 s" (the client's timeout) after waiting 19 s for a 4 MiB wheel."""
    from aether.client.management import ApiNoAnswer

    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            release.wait(30)  # takes the body, never answers in time

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        wheel = tmp_path / "w.whl"
        wheel.write_bytes(b"x" * (512 * 1024))
        client = ManagementClient(f"127.0.0.1:{srv.server_address[1]}", timeout=1.0)
        with pytest.raises(ApiNoAnswer) as caught:
            client.upload("/api/v1/repository/files/w.whl", wheel)
        assert caught.value.timeout == 1.5
        assert str(caught.value).endswith("took the request but gave no answer within 1.5 s"), caught.value
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()


def test_text_that_cannot_be_sent_is_a_config_error_not_an_unreachable_node(servers: Servers) -> None:
    """`aether kv list $'\\xff'` (the shell's byte arrives as a lone surrogate) failed inside the
    request and was reported as "cannot reach the Aether node at ... ('utf-8' codec can't encode
    ...)", exit 3, although the node answered everything else. Now the client names the parameter
    before sending, whichever command passed it."""
    from aether.core.errors import ConfigError

    srv = servers.start(_node())
    client = ManagementClient(f"http://{addr(srv)}")
    with pytest.raises(ConfigError, match=r"query parameter 'prefix' 'user/\\udcff' is not UTF-8 text"):
        client.get_raw("/api/v1/kv", {"prefix": "user/\udcff"})
    with pytest.raises(ConfigError, match=r"path .* is not UTF-8 text"):
        client.get_raw("/api/v1/maps/\udcff")
    assert client.kv("config/") == [KVEntry("config/a", {"x": 1})]  # the node was reachable all along
