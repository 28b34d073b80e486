"""Crash, restart and bad-input behaviour of a REAL 3-node cluster (one OS process per node, loopback).

Every test starts its own cluster through the `make_process_cluster` / `process_cluster`
fixtures (tests/conftest.py): free ports, data dirs under tmp_path, logs in files, every PID
killed in a `finally`, node log tails attached to the report when a test fails.

Timing bounds are deadlines for progress (a test fails if progress does not come in time); the
only bound that is a requirement of its own is "a write without quorum fails within 2 s".
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

from aether.core.errors import AetherError, QuorumLost

if TYPE_CHECKING:
    from conftest import ProcessCluster

HOST = "127.0.0.1"

# --------------------------------------------------------------------------------------------------
# helpers


async def until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> float:
    """Wait until `pred()` is true; returns the seconds it took, fails the test after `timeout`."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - t0


async def put_all(client, items: dict[str, bytes], concurrency: int = 16) -> None:
    """Write every item (bounded concurrency); every put must be acknowledged."""
    sem = asyncio.Semaphore(concurrency)

    async def one(k: str, v: bytes) -> None:
        async with sem:
            await client.put(k, v)

    await asyncio.gather(*(one(k, v) for k, v in items.items()))


async def assert_readable(client, expected: dict[str, bytes], concurrency: int = 32) -> None:
    """Linearizable read of every key; all must have the expected value."""
    sem = asyncio.Semaphore(concurrency)
    wrong: list[tuple[str, bytes, bytes | None]] = []

    async def one(k: str, v: bytes) -> None:
        async with sem:
            got = await client.get(k)
        if got != v:
            wrong.append((k, v, got))

    await asyncio.gather(*(one(k, v) for k, v in expected.items()))
    assert not wrong, f"{len(wrong)} of {len(expected)} acknowledged writes lost or wrong, e.g. {wrong[:5]}"


def assert_listing_has(listing: dict[str, object], expected: dict[str, bytes], node: str) -> None:
    missing = [k for k in expected if k not in listing]
    wrong = [k for k, v in expected.items() if k in listing and listing[k] != v.decode()]
    assert not missing and not wrong, (
        f"{node}: {len(missing)} acknowledged keys missing (e.g. {missing[:5]}), "
        f"{len(wrong)} with a wrong value (e.g. {wrong[:5]})"
    )


class Writers:
    """One closed-loop writer per client, each writing its own sequence of unique keys."""

    def __init__(self, clients: list, prefix: str, pause: float = 0.004) -> None:
        self.clients = clients
        self.prefix = prefix
        self.pause = pause
        self.acked: dict[str, bytes] = {}
        self.ack_times: list[list[float]] = [[] for _ in clients]
        self.errors: list[tuple[int, str, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(w, c)) for w, c in enumerate(self.clients)]

    async def _run(self, w: int, client) -> None:
        seq = 0
        while not self._stop.is_set():
            key = f"{self.prefix}/w{w}/{seq:06d}"
            value = f"{w}:{seq}".encode()
            seq += 1
            try:
                await client.put(key, value)
            except AetherError as e:
                self.errors.append((w, key, repr(e)))
                await asyncio.sleep(0.05)
                continue
            self.acked[key] = value
            self.ack_times[w].append(time.monotonic())
            await asyncio.sleep(self.pause)

    def acks_after(self, w: int, t: float) -> int:
        return sum(1 for x in self.ack_times[w] if x > t)

    def first_ack_after(self, w: int, t: float) -> float | None:
        return next((x for x in self.ack_times[w] if x > t), None)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


# --------------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_kill9_follower_then_leader_writes_keep_committing(process_cluster: ProcessCluster) -> None:
    c = process_cluster
    leader = c.leader_index()
    follower = max(i for i in range(c.n) if i != leader)
    # two closed-loop writers per node, so writes are in flight at the moment of each kill
    clients = [c.client(prefer=i % c.n) for i in range(2 * c.n)]
    for cl in clients:
        await cl.__aenter__()
    try:
        for i, cl in enumerate(clients):
            assert str(cl.connected_to) == c.address(i % c.n)
        # the leader also writes the distributed map's partition table when nodes come and go: count
        # those writes (one revision each) from a settled table to the end
        table0 = await _settled_table(c, 0, c.n)
        rev0 = await clients[0].put("user/fo/start", b"start")  # store revision before the load
        wr = Writers(clients, "user/fo", pause=0.001)
        failovers_seen: dict[int, int] = {}
        wr.start()
        await until(lambda: all(len(t) >= 20 for t in wr.ack_times), 10, "warm-up writes on every node")

        async def kill_and_check(victim: int, label: str) -> None:
            t_kill = time.monotonic()
            c.kill9(victim)
            # every writer, including the one whose node died, keeps committing
            await until(
                lambda: all(wr.acks_after(w, t_kill) >= 20 for w in range(len(clients))),
                8,
                f"20 acknowledged writes per client after kill -9 of the {label} {c.ids[victim]}",
            )
            gaps = [round((wr.first_ack_after(w, t_kill) - t_kill) * 1e3) for w in range(len(clients))]
            print(
                f"kill -9 {label} {c.ids[victim]}: ms from kill to first ack, per client "
                f"(client k preferred node k mod {c.n}): {gaps}"
            )
            for w, cl in enumerate(clients):
                if w % c.n == victim:  # a client of the killed node: it must have failed over
                    assert cl.connected_to is not None
                    assert str(cl.connected_to) != c.address(victim), f"client {w} did not fail over"
                    failovers_seen[w] = cl.failovers

        await kill_and_check(follower, "follower")
        c.start(follower)
        await c.await_quorum(30)  # every running node sees all running nodes up again
        await kill_and_check(leader, "leader")
        await wr.stop()

        assert not wr.errors, f"{len(wr.errors)} writes failed while a quorum was up: {wr.errors[:5]}"
        survivors = c.running()
        assert len(survivors) == 2
        reader = clients[survivors[0]]
        await assert_readable(reader, wr.acked)
        # exactly once: every applied put adds 1 to the store revision, so a write that was retried
        # after a failover and applied twice would push the revision past the count (this assumes
        # nothing else writes to the store meanwhile, true for a cluster with no slices deployed)
        table1 = await _settled_table(c, survivors[0], len(survivors))
        revision = await reader.put("user/fo/final", b"end")
        # the leader's new tables, and each takeover recorded in the table (docs/maps.md)
        table_writes = (table1["version"] - table0["version"]) + (
            table1.get("activations", 0) - table0.get("activations", 0)
        )
        assert revision - rev0 == len(wr.acked) + 1 + table_writes, (
            f"store revision went from {rev0} to {revision} for {len(wr.acked) + 1} acknowledged puts "
            f"and {table_writes} partition table writes"
        )
        # and every surviving replica applied them (local view over the management API)
        await asyncio.to_thread(c.wait_applied_equal, 20)
        for i in survivors:
            assert_listing_has(await c.akv(i, "user/fo/"), wr.acked, c.ids[i])
        print(f"{len(wr.acked)} acknowledged writes, all readable")
        # checked last so that the data checks above run either way: `failovers` must count the
        # failovers the clients of the killed nodes made
        assert all(n >= 1 for n in failovers_seen.values()), (
            f"AetherClient.failovers of the clients whose node was killed (by client): {failovers_seen}"
        )
    finally:
        for cl in clients:
            await cl.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_kill_two_of_three_quorum_lost_fast_then_resumes(process_cluster: ProcessCluster) -> None:
    c = process_cluster
    survivor, victims = 0, [1, 2]
    before = {f"user/q/{k:04d}": f"before-{k}".encode() for k in range(100)}
    async with (
        c.client(prefer=survivor) as cl,
        c.client(prefer=survivor, only=[survivor]) as solo,
        c.client(prefer=survivor, only=[survivor]) as busy,
    ):
        await put_all(cl, before)
        await solo.put("user/q/solo-warm", b"w")  # connected and working
        before["user/q/solo-warm"] = b"w"

        # a closed-loop writer on the survivor, so a write is in flight when the others die
        first_failure: list[tuple[float, BaseException]] = []
        busy_acked: dict[str, bytes] = {}

        async def keep_writing() -> None:
            k = 0
            while True:
                key, value = f"user/q/busy{k:05d}", f"busy-{k}".encode()
                k += 1
                try:
                    await busy.put(key, value)
                except Exception as e:
                    first_failure.append((time.monotonic(), e))
                    return
                busy_acked[key] = value

        busy_task = asyncio.create_task(keep_writing())
        await until(lambda: len(busy_acked) >= 20, 5, "the busy writer to commit")
        t_kill = time.monotonic()
        for v in victims:
            c.kill9(v)
        # a client that knows every node: it tries the dead ones too, then must give up clearly
        t_issue = time.monotonic()
        with pytest.raises(QuorumLost):
            await cl.put("user/q/no-quorum-1", b"x")
        t_fail = time.monotonic()
        print(
            f"QuorumLost after {1e3 * (t_fail - t_issue):.0f} ms from the write, "
            f"{1e3 * (t_fail - t_kill):.0f} ms from the kill"
        )
        assert t_fail - t_issue < 2.0, f"QuorumLost took {t_fail - t_issue:.2f}s from issuing the write"
        assert t_fail - t_kill < 2.0, f"QuorumLost took {t_fail - t_kill:.2f}s from the kill"
        # a client that only knows the survivor
        t_issue = time.monotonic()
        with pytest.raises(QuorumLost):
            await solo.put("user/q/no-quorum-2", b"x")
        assert time.monotonic() - t_issue < 2.0
        st = await c.astatus(survivor)
        assert st["quorum"] is False, st
        # the write that was in flight at the kill ends with a clear error, also within 2 s
        await asyncio.wait_for(busy_task, 5)
        t_busy, exc = first_failure[0]
        print(
            f"in-flight write failed with {type(exc).__name__} "
            f"{1e3 * (t_busy - t_kill):.0f} ms after the kill"
        )
        assert isinstance(exc, QuorumLost), repr(exc)
        assert t_busy - t_kill < 2.0, f"the in-flight write failed only {t_busy - t_kill:.2f}s after the kill"
        before |= busy_acked

        t_restart = time.monotonic()
        for v in victims:
            c.start(v)
        resumed_at = None
        attempts = 0
        while time.monotonic() - t_restart < 15:
            attempts += 1
            try:
                await cl.put("user/q/after-restart", b"back")
            except (QuorumLost, AetherError, ConnectionError):
                await asyncio.sleep(0.05)
                continue
            resumed_at = time.monotonic()
            break
        assert resumed_at is not None, "writes did not resume within 15 s of restarting the two nodes"
        print(
            f"writes resumed {1e3 * (resumed_at - t_restart):.0f} ms after the restart ({attempts} attempts)"
        )
        assert resumed_at - t_restart < 8.0, f"writes resumed only after {resumed_at - t_restart:.1f}s"
        before["user/q/after-restart"] = b"back"

        await c.await_quorum(30)
        await assert_readable(cl, before)
        await assert_readable(solo, before)
    await asyncio.to_thread(c.wait_applied_equal, 20)
    for i in range(c.n):
        assert_listing_has(await c.akv(i, "user/q/"), before, c.ids[i])


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_full_cluster_restart_sigterm_and_kill9_keeps_committed_data(
    process_cluster: ProcessCluster,
) -> None:
    c = process_cluster
    data = {f"user/r/a{k:04d}": f"a-{k}".encode() for k in range(200)}
    async with c.client(prefer=0) as cl:
        await put_all(cl, data)

    rcs = c.stop_all()
    assert rcs == [0] * c.n, f"clean shutdown exit codes: {rcs}"
    c.start_all()
    await c.await_quorum(30)
    async with c.client(prefer=1) as cl:
        await assert_readable(cl, data)
        more = {f"user/r/b{k:04d}": f"b-{k}".encode() for k in range(200)}
        await put_all(cl, more)
        data |= more
        # the last writes right before the crash: acknowledged, maybe only in the journal
        await cl.put("user/r/last", b"last")
        data["user/r/last"] = b"last"

    c.kill9_all()
    c.start_all()
    await c.await_quorum(30)
    async with c.client(prefer=2) as cl:
        await assert_readable(cl, data)
    await asyncio.to_thread(c.wait_applied_equal, 20)
    for i in range(c.n):
        assert_listing_has(await c.akv(i, "user/r/"), data, c.ids[i])


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_node_down_during_1000_writes_catches_up(process_cluster: ProcessCluster) -> None:
    c = process_cluster
    lag = 2
    c.kill9(lag)
    data = {f"user/c/{k:04d}": f"c-{k}".encode() for k in range(1000)}
    async with c.client(prefer=0, only=[0, 1]) as cl:
        await put_all(cl, data, concurrency=20)
    assert c.kv(0, "user/c/").keys() >= data.keys()

    t0 = time.monotonic()
    c.start(lag)
    state: dict[str, object] = {}

    def caught_up() -> bool:
        try:
            listing = c.kv(lag, "user/c/")
            slots = [c.status(i)["applied_slot"] for i in range(c.n)]
        except Exception as e:  # still starting
            state["last"] = repr(e)
            return False
        state["last"] = f"{len(listing)} keys, applied slots {slots}"
        return all(listing.get(k) == v.decode() for k, v in data.items()) and len(set(slots)) == 1

    async def poll() -> bool:
        return await asyncio.to_thread(caught_up)

    deadline = t0 + 20
    while not await poll():
        c.check_alive()
        if time.monotonic() > deadline:
            pytest.fail(f"{c.ids[lag]} did not catch up within 20 s of its restart: {state['last']}")
        await asyncio.sleep(0.1)
    print(f"{c.ids[lag]} caught up {1e3 * (time.monotonic() - t0):.0f} ms after restart: {state['last']}")
    # it also serves linearizable reads on its own
    async with c.client(prefer=lag, only=[lag]) as own:
        assert await own.get("user/c/0999") == b"c-999"
        assert await own.get("user/c/0000") == b"c-0"


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _recv_frame(sock: socket.socket) -> bytes:
    """One whole frame's payload (blocking)."""
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
    (length,) = struct.unpack(">I", buf[:4])
    return buf[4 : 4 + length]


def _recv_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the node closes the connection (b'' or a reset); returns what arrived."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_bad_input_on_cluster_port_is_logged_and_survived(process_cluster: ProcessCluster) -> None:
    from aether.transport.auth import Credentials, DialerHandshake
    from aether.transport.messages import Challenge, ClientHello, HelloAck, Proof

    c = process_cluster
    target = 0
    port = c.cluster_ports[target]
    expect: list[tuple[str, int, tuple[str, ...]]] = []  # (case, local port, words of its WARNING)

    def connect() -> socket.socket:
        return socket.create_connection((HOST, port), timeout=5)

    def run_cases() -> None:
        # 1. garbage: a frame whose payload is not msgpack (0xc1 is never used by msgpack)
        with connect() as s:
            s.sendall(_frame(b"\xc1" * 8))
            expect.append(("garbage", s.getsockname()[1], ("not a valid hello", "undecodable")))
            _recv_until_closed(s)  # the node rejects and closes
        # 2. raw garbage that is not even framed: its first 4 bytes read as a huge length
        with connect() as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            expect.append(("raw-garbage", s.getsockname()[1], ("more than the limit",)))
            _recv_until_closed(s)
        # 3. truncated frame: header announces 100 bytes, 10 arrive, then the client closes
        with connect() as s:
            s.sendall(struct.pack(">I", 100) + b"\x00" * 10)
            expect.append(("truncated", s.getsockname()[1], ("middle of a frame",)))
            s.shutdown(socket.SHUT_WR)
            _recv_until_closed(s)
        # 4. oversized length header
        with connect() as s:
            s.sendall(b"\xff\xff\xff\xff")
            expect.append(("oversized", s.getsockname()[1], ("4294967295", "more than the limit")))
            _recv_until_closed(s)
        # 5. unknown msgpack frame as the first frame (tag 99 is no message)
        with connect() as s:
            s.sendall(_frame(msgspec.msgpack.encode([99, "what"])))
            expect.append(("unknown-first", s.getsockname()[1], ("not a valid hello", "undecodable")))
            _recv_until_closed(s)
        # 6. unknown msgpack frame on an established client session: dropped, session survives
        with connect() as s:
            s.settimeout(5)
            auth = DialerHandshake(Credentials(c.cluster_name, secret=c.secret), "client", "bad-input-test")
            hello = ClientHello(c.cluster_name, "bad-input-test", auth.nonce)
            s.sendall(_frame(msgspec.msgpack.encode(hello)))
            challenge = msgspec.msgpack.decode(_recv_frame(s), type=Challenge)
            proof = auth.answer(challenge.node_id, challenge.nonce, challenge.proof)
            s.sendall(_frame(msgspec.msgpack.encode(Proof(proof))))
            assert msgspec.msgpack.decode(_recv_frame(s), type=HelloAck), "no HelloAck after a valid proof"
            s.sendall(_frame(msgspec.msgpack.encode([99, "what"])))
            expect.append(("unknown-established", s.getsockname()[1], ("undecodable", "frame dropped")))
            # the session still answers: a local read (ClientReadLocal, tag 32)
            s.sendall(_frame(msgspec.msgpack.encode([32, 7, "user/none"])))
            reply = s.recv(4096)
            assert reply, "the session closed after one bad frame"
            (length,) = struct.unpack(">I", reply[:4])
            resp = msgspec.msgpack.decode(reply[4 : 4 + length])
            assert resp[0] == 31 and resp[1] == 7, resp  # ClientResponse to request 7

    await asyncio.to_thread(run_cases)

    # the node is alive, still in the cluster, and serves writes itself (no failover possible)
    assert c.is_running(target)
    await c.await_quorum(10)
    async with c.client(prefer=target, only=[target]) as cl:
        await cl.put("user/bad/after", b"fine")
        assert await cl.get("user/bad/after") == b"fine"

    def warnings_for(lport: int, words: tuple[str, ...]) -> list[str]:
        return c.log_lines(target, "WARNING", f"{HOST}:{lport}", *words)

    missing: list[str] = []

    def all_logged() -> bool:
        missing[:] = [case for case, lport, words in expect if not warnings_for(lport, words)]
        return not missing

    t0 = time.monotonic()
    while not all_logged() and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.1)
    assert len(expect) == 6
    assert not missing, f"no WARNING line in {c.ids[target]}'s log for: {missing}\n{c.log_tail(target, 60)}"
    assert not c.log_lines(target, "Traceback"), "a traceback in the node log:\n" + c.log_tail(target, 60)


async def _settled_table(c: ProcessCluster, i: int, members: int, timeout: float = 15.0) -> dict[str, Any]:
    """The partition table node `i` holds once it lists `members` nodes and the takeovers it
    caused are recorded (it stayed the same for a second)."""
    end = time.monotonic() + timeout
    stable_since, last = time.monotonic(), None
    while True:
        table = (await c.akv(i, "maps/table")).get("maps/table")
        if table != last:
            stable_since, last = time.monotonic(), table
        if table is not None and len(table["members"]) == members and time.monotonic() - stable_since >= 1.0:
            return dict(table)
        assert time.monotonic() < end, f"no settled table with {members} members on {c.ids[i]}: {table}"
        await asyncio.sleep(0.05)
