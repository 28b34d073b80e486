"""Internal: the asyncio protocol base shared by peer links, client sessions and the client connector.

It owns what every connection needs: framing (`FrameDecoder`), message decoding, bad-input
accounting with rate-limited logging, and coalesced writes. Subclasses implement ``_handle``
(one decoded message) and ``_on_closed`` (the connection is gone).

Write coalescing: ``write_frame`` appends an encoded frame to a per-connection list and, for the
first frame of a batch, schedules ``_flush`` with ``loop.call_soon``; the flush hands everything
to the asyncio transport in one ``write`` call. So frames produced within one event-loop
iteration leave in one syscall, in the order they were written.

Link faults (`aether.transport.faults`): while ``fault`` is set (the Transport sets it on the
links to a peer it was told to fault), every frame written (``write_frame`` and ``write_now``
alike) goes through `faults.decide`: dropped, or queued until its due time and then written by one
``loop.call_at`` timer per connection (due times never decrease, so the queue is in order). Unset,
the write path pays one attribute test. Frames still queued when the connection closes are lost.
The queue holds at most ``max_write_buffer`` bytes; beyond, frames are dropped (a full router queue).

Bad input policy (per connection):
- oversized length header: one WARNING, connection aborted at once (the stream cannot be resynced);
- undecodable frame (garbage, unknown tag, wrong shape) or an unexpected control message during
  the handshake: one WARNING, hello answered with ``Reject`` where it makes sense, connection closed;
- the same on an established link: the frame is dropped; the first one is logged (WARNING), later
  ones are only counted; after more than `MAX_BAD_FRAMES` the connection is closed (INFO);
- the remote closing in the middle of a frame: one WARNING.
Nothing raised while handling input escapes ``data_received``.

Buffer budget (optional, one `BufferBudget` per node shared by all its connections): after each
read a connection reserves the whole unfinished frame it holds (``FrameDecoder.pending``). If that
does not fit, a connection that may wait (an authenticated peer) first has connections that may
not (clients, unauthenticated) closed to make room, largest reservation first, and if it still does
not fit stops reading until room frees; any other connection is closed. Closing releases the share.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import msgspec

from aether.transport.auth import AuthFailed, DialerHandshake
from aether.transport.faults import LinkFault, decide
from aether.transport.framing import FrameDecoder, FrameTooLarge
from aether.transport.messages import Challenge, HelloAck, Proof, Reject, WireCodec

MAX_BAD_FRAMES = 10
"""An established connection is closed when more than this many bad frames arrived on it."""

DEFAULT_MAX_WRITE_BUFFER = 64 * 1024 * 1024
"""A connection whose unsent data exceeds this is dropped rather than allowed to grow."""

DRAINING: LinkFault = LinkFault()
"""The fault of a link whose fault was cleared while frames were still delayed on it: new frames
queue behind them (order kept), and the link drops it once the queue is empty."""

_RELEASE_SLACK = 0.001  # a timer may fire up to the clock resolution early: frames this close are due


class BufferBudget:
    """Bytes one node may hold in unfinished inbound frames, over all its connections.

    Each connection is charged the full size of the frame it is assembling (header plus announced
    payload, `FrameDecoder.pending`), so ``used`` bounds the memory held in partial frames. A
    connection whose frame does not fit what is left is closed, unless it may wait (an
    authenticated peer): then clients and unauthenticated connections are closed to make room
    (largest first) and, if it still does not fit, its reading is paused until room frees (FIFO).
    A peer never waits for room that nobody will free: if every other holder waits too, it goes
    ahead (so ``used`` may then exceed ``limit`` by what the waiting peers hold: at most one read
    each). While a peer waits, clients needing more are closed rather than served first.
    """

    __slots__ = ("_holders", "_waiting", "evicted", "limit", "paused", "peak", "refused", "used")

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("the buffer budget must be positive")
        self.limit = limit
        self.used = 0
        self.peak = 0  # the highest `used` seen
        self.paused = 0  # times a peer connection was paused waiting for room
        self.refused = 0  # connections closed because their frame did not fit
        self.evicted = 0  # connections closed to make room for a peer
        self._holders: dict[LinkProtocol, int] = {}  # connection -> bytes charged (> 0)
        self._waiting: dict[LinkProtocol, int] = {}  # paused peer connection -> bytes it needs (FIFO)

    def charged(self, conn: LinkProtocol) -> int:
        return self._holders.get(conn, 0)

    @property
    def waiting(self) -> int:
        """Connections paused until room frees."""
        return len(self._waiting)

    def _set(self, conn: LinkProtocol, amount: int) -> None:
        holders = self._holders
        used = self.used = self.used + amount - holders.get(conn, 0)
        if used > self.peak:
            self.peak = used
        if amount:
            holders[conn] = amount
        else:
            holders.pop(conn, None)

    def _fits(self, conn: LinkProtocol, need: int) -> bool:
        return self.used - self._holders.get(conn, 0) + need <= self.limit

    def _others_running(self, conn: LinkProtocol) -> bool:
        """True if a connection other than `conn` holds budget and is reading (so it will free it)."""
        waiting = self._waiting
        return any(c is not conn and c not in waiting for c in self._holders)

    def settle(self, conn: LinkProtocol, need: int, held: int) -> None:
        """`conn` now assembles a frame of `need` bytes of which it holds `held`: reserve it, or wait
        (peers) or be closed (others). Called after every read that changed `need`."""
        old = self._holders.get(conn, 0)
        if need <= old:  # shrank (a frame completed): always fine
            self._set(conn, need)
            if conn in self._waiting:
                self._admit(conn, need)
            if need < old:
                self._wake()
            return
        may_wait = conn.may_wait_for_budget()
        if self._fits(conn, need) and (may_wait or not self._waiting):
            self._set(conn, need)
            if conn in self._waiting:
                self._admit(conn, need)
            return
        if not may_wait:
            self._set(conn, 0)
            self.refused += 1
            conn.budget_refused(need, self)
            self._wake()
            return
        self._evict(conn, need)
        if self._fits(conn, need) or not self._others_running(conn):
            self._set(conn, need)
            if conn in self._waiting:
                self._admit(conn, need)
            return
        self._set(conn, held)  # what it really holds while it waits
        if conn not in self._waiting:
            self.paused += 1
            conn.pause_for_budget()
        self._waiting[conn] = need

    def release(self, conn: LinkProtocol) -> None:
        """`conn` is closing: its share returns to the budget."""
        self._waiting.pop(conn, None)
        if conn in self._holders:
            self._set(conn, 0)
            self._wake()

    def _admit(self, conn: LinkProtocol, need: int) -> None:
        del self._waiting[conn]
        conn.resume_for_budget()

    def _evict(self, peer: LinkProtocol, need: int) -> None:
        """Close connections that may not wait, largest charge first, until `need` fits for `peer`."""
        victims = sorted(
            (c for c in self._holders if c is not peer and not c.may_wait_for_budget()),
            key=self._holders.__getitem__,
            reverse=True,
        )
        for victim in victims:
            if self._fits(peer, need):
                return
            held = self._holders.get(victim, 0)
            self._set(victim, 0)
            self.evicted += 1
            victim.budget_evicted(held, peer, self)

    def _wake(self) -> None:
        for conn, need in list(self._waiting.items()):
            if conn not in self._waiting:
                continue
            if not self._fits(conn, need):
                self._evict(conn, need)
            if self._fits(conn, need) or not self._others_running(conn):
                self._set(conn, need)
                self._admit(conn, need)
            else:
                return  # first come, first served


class HeardFrom:
    """Anything that records when a frame last arrived (a peer record)."""

    __slots__ = ("last_heard",)

    def __init__(self) -> None:
        self.last_heard = 0.0


def format_peername(peername: Any) -> str:
    """Render ``get_extra_info('peername')`` as ``host:port``."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peername) if peername else "?"


class FramedEndpoint:
    """What both ends of a client connection share: `closed` and a coalescing `send`.

    Subclasses set `_proto` (the LinkProtocol) and `_frame` (message -> encoded frame).
    """

    __slots__ = ()
    _proto: LinkProtocol
    _frame: Callable[[object], bytes]

    @property
    def closed(self) -> bool:
        return self._proto.closing

    def send(self, msg: object) -> bool:
        """Queue `msg` (coalesced with the other frames of this loop iteration); False if closed."""
        if self._proto.closing:
            return False
        return self._proto.write_frame(self._frame(msg))


class LinkProtocol(asyncio.Protocol):
    """Framed, coalescing, bad-input-tolerant connection. See the module docstring."""

    def __init__(
        self,
        *,
        loop: asyncio.AbstractEventLoop,
        log: logging.Logger,
        prefix: str,
        codec: WireCodec,
        decode: Callable[[bytes], Any],
        max_frame: int,
        max_write_buffer: int = DEFAULT_MAX_WRITE_BUFFER,
        budget: BufferBudget | None = None,
    ) -> None:
        self._loop = loop
        self._budget = budget
        self._log = log
        self._prefix = prefix
        self._codec = codec
        self._decode = decode
        self._frames = FrameDecoder(max_frame)
        self._max_write_buffer = max_write_buffer
        self._pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.remote = "?"
        self.wrote = False  # set by every write; the heartbeat timer clears it
        self.closing = False
        self.close_reason: str | None = None
        self.established = False
        self.bad_frames = 0
        self.heard: HeardFrom | None = None
        self.finished: asyncio.Future[None] = loop.create_future()  # done once connection_lost ran
        # link faults (module docstring): None on a healthy link
        self.fault: LinkFault | None = None
        self.fault_rng: random.Random | None = None
        self.frames_dropped = 0  # by the fault (lost, blocked or queue full)
        self.frames_delayed = 0
        self._delayed: deque[tuple[float, bytes]] | None = None  # (due, frame), due never decreasing
        self._delayed_bytes = 0
        self._last_due = 0.0
        self._delay_timer: asyncio.TimerHandle | None = None

    # ---- description / logging -------------------------------------------------------------

    def describe(self) -> str:
        return f"connection from {self.remote}"

    def _warn(self, problem: str) -> None:
        self._log.warning("%s %s: %s", self._prefix, self.describe(), problem)

    # ---- connection lifecycle --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance-checked: uvloop's transports implement the interface without subclassing.
        tr = cast(asyncio.Transport, transport)
        self.transport = tr
        self.remote = format_peername(tr.get_extra_info("peername"))
        if self.closing:  # closed (e.g. its owner stopped) before the connection completed
            tr.abort()
            return
        sock = tr.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError, TypeError, ValueError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        remote_closed = self.close_reason is None
        self.closing = True
        self._pending.clear()
        self._drop_delayed()
        if self._budget is not None:
            self._budget.release(self)
        if remote_closed:
            buffered = self._frames.buffered
            if buffered:
                self._warn(f"connection closed in the middle of a frame ({buffered} bytes discarded)")
            self.close_reason = f"connection lost: {exc}" if exc else "connection closed by the remote side"
        try:
            self._on_closed(exc)
        except Exception:
            self._log.exception("%s error while cleaning up %s", self._prefix, self.describe())
        if not self.finished.done():
            self.finished.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # let the transport close itself

    def close(self, reason: str) -> None:
        """Flush pending frames, then close gracefully."""
        if self.closing:
            return
        self._flush()
        self.closing = True
        self._drop_delayed()
        if self.close_reason is None:
            self.close_reason = reason
        if self._budget is not None:
            self._budget.release(self)  # nothing more is read: the partial frame is dead
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        """Close at once, dropping unsent data."""
        if self.close_reason is None:
            self.close_reason = reason
        self.closing = True
        self._pending.clear()
        self._drop_delayed()
        if self._budget is not None:
            self._budget.release(self)
        if self.transport is not None:
            self.transport.abort()

    # ---- writing ----------------------------------------------------------------------------

    def write_frame(self, frame: bytes) -> bool:
        """Queue one encoded frame; it is written with the rest of this loop iteration's frames."""
        if self.closing or self.transport is None:
            return False
        self.wrote = True
        if self.fault is not None:
            self._faulty_write(frame, False)
            return True
        pending = self._pending
        pending.append(frame)
        if len(pending) == 1:
            self._loop.call_soon(self._flush)
        return True

    def write_now(self, frame: bytes) -> None:
        """Write `frame` immediately, after anything still pending (used for handshake frames);
        on a faulted link, when the fault lets it go."""
        if self.closing or self.transport is None:
            return
        if self.fault is not None:
            self._faulty_write(frame, True)
            return
        self._pending.append(frame)
        self._flush()

    # ---- link faults --------------------------------------------------------------------------

    def set_fault(self, fault: LinkFault | None, rng: random.Random) -> None:
        """Apply `fault` to the frames written from now on (None: heal the link; frames already
        delayed still leave at their time, and new ones wait behind them)."""
        if fault is None:
            self.fault = DRAINING if self._delayed else None
        else:
            self.fault = fault
        self.fault_rng = rng

    @property
    def delayed_frames(self) -> int:
        """Frames waiting for their due time."""
        return len(self._delayed) if self._delayed else 0

    def _faulty_write(self, frame: bytes, flush: bool) -> None:
        fault = self.fault
        rng = self.fault_rng
        assert fault is not None and rng is not None
        loop = self._loop
        now = loop.time()
        due = decide(fault, rng, now, self._last_due)
        if due is None:
            self.frames_dropped += 1
            return
        delayed = self._delayed
        if due <= now and not delayed:  # leaves now, as on a healthy link
            pending = self._pending
            pending.append(frame)
            if flush:
                self._flush()
            elif len(pending) == 1:
                loop.call_soon(self._flush)
            return
        if self._delayed_bytes + len(frame) > self._max_write_buffer:
            self.frames_dropped += 1  # the "network" queue is full: tail drop
            return
        if delayed is None:
            delayed = self._delayed = deque()
        delayed.append((due, frame))
        self._delayed_bytes += len(frame)
        self._last_due = due
        self.frames_delayed += 1
        if self._delay_timer is None:
            self._delay_timer = loop.call_at(due, self._release)

    def _release(self) -> None:
        """The delay timer: write every frame now due (one write), then wait for the next."""
        self._delay_timer = None
        delayed = self._delayed
        if not delayed or self.closing or self.transport is None:
            return
        limit = self._loop.time() + _RELEASE_SLACK
        pending = self._pending
        # the head is due (the timer was set for it; it may fire a clock tick early), then the rest
        # that are due by now
        while True:
            frame = delayed.popleft()[1]
            self._delayed_bytes -= len(frame)
            pending.append(frame)
            if not delayed or delayed[0][0] > limit:
                break
        self._flush()
        if delayed:
            self._delay_timer = self._loop.call_at(delayed[0][0], self._release)
        elif self.fault is DRAINING:
            self.fault = None  # healed and drained: back to the plain write path

    def _drop_delayed(self) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        if self._delayed:
            self._delayed.clear()
        self._delayed_bytes = 0

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        transport = self.transport
        if self.closing or transport is None:
            pending.clear()
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        try:
            transport.write(data)
            buffered = transport.get_write_buffer_size()
        except Exception as exc:  # the transport is already broken; connection_lost follows
            self.abort(f"write failed: {exc}")
            return
        if buffered > self._max_write_buffer:
            self._warn(
                f"{buffered} bytes of unsent data exceed the limit of {self._max_write_buffer}; "
                "dropping the connection (the remote side is not reading)"
            )
            self.abort("write buffer overflow")

    def reject(self, reason: str, code: str = "") -> None:
        """Send ``Reject(reason, code)`` and close."""
        self.write_now(self._codec.frame(Reject(reason, code)))
        self.close(f"rejected: {reason}")

    # ---- reading ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            too_large: FrameTooLarge | None = None
            try:
                frames = self._frames.feed(data)
            except FrameTooLarge as exc:
                too_large, frames = exc, exc.frames
            heard = self.heard
            if heard is not None:  # any bytes count, even part of a large frame
                heard.last_heard = self._loop.time()
            for payload in frames:
                if self.closing:
                    return
                try:
                    msg = self._decode(payload)
                except msgspec.DecodeError as exc:
                    self._bad_frame(f"undecodable frame of {len(payload)} bytes ({exc})")
                    continue
                self._handle(msg)
            budget = self._budget
            if budget is not None and not self.closing:
                frames_ = self._frames
                need = frames_.pending
                if need != budget.charged(self):
                    budget.settle(self, need, frames_.buffered)
            if too_large is not None and not self.closing:
                self._warn(
                    f"frame header announces {too_large.size} bytes, more than the limit of "
                    f"{too_large.limit}; closing the connection"
                )
                self.abort("oversized frame header")
        except Exception:
            self._log.exception(
                "%s internal error handling data from %s; closing it", self._prefix, self.describe()
            )
            self.abort("internal error")

    def _dialer_handshake(self, auth: DialerHandshake, msg: Any) -> HelloAck | Reject | None:
        """The dialer's side of the handshake (peer links and clients), for a frame `msg` received
        before the connection is established: a Challenge is checked and answered with our Proof;
        the HelloAck (only after our proof) or Reject that ends the handshake is returned for the
        caller to act on; anything else, or a failed check, fails it (``_handshake_failed``)."""
        cls = type(msg)
        if cls is Challenge and not auth.proved:
            try:
                proof = auth.answer(msg.node_id, msg.nonce, msg.proof)
            except AuthFailed as exc:
                self._handshake_failed(str(exc))
                return None
            self.write_now(self._codec.frame(Proof(proof)))
            return None
        if (cls is HelloAck and auth.proved) or cls is Reject:
            return cast(HelloAck | Reject, msg)
        self._handshake_failed(f"expected {'HelloAck' if auth.proved else 'Challenge'}, got {cls.__name__}")
        return None

    def _bad_frame(self, problem: str) -> None:
        if not self.established:
            self._handshake_failed(problem)
            return
        self.bad_frames += 1
        if self.bad_frames == 1:
            self._warn(
                f"{problem}; frame dropped (further bad frames on this connection are counted, not logged)"
            )
        elif self.bad_frames > MAX_BAD_FRAMES:
            self._log.info(
                "%s %s: closing after %d bad frames", self._prefix, self.describe(), self.bad_frames
            )
            self.close(f"too many bad frames ({self.bad_frames})")

    # ---- buffer budget ----------------------------------------------------------------------

    def may_wait_for_budget(self) -> bool:
        """True if this connection waits (paused) for room in the buffer budget instead of being
        closed: authenticated peers. Default: no."""
        return False

    def pause_for_budget(self) -> None:
        self._log.debug(
            "%s %s: unfinished frame does not fit the buffer budget; pausing reads",
            self._prefix,
            self.describe(),
        )
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_for_budget(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def budget_refused(self, need: int, budget: BufferBudget) -> None:
        """This connection's frame does not fit the budget and it may not wait: log and close."""
        self._budget_log(
            "refused",
            f"its unfinished frame of {need} bytes does not fit the node's buffer budget "
            f"(max_buffered_bytes={budget.limit}, {budget.used} in use by other connections"
            f"{', peers waiting' if budget.waiting else ''}); closing the connection"
        )
        self.abort("buffer budget exhausted")

    def budget_evicted(self, held: int, peer: LinkProtocol, budget: BufferBudget) -> None:
        """Closed to make room for `peer`'s frame."""
        self._budget_log(
            "evicted",
            f"closing it to make room for {peer.describe()}: the node's buffer budget "
            f"(max_buffered_bytes={budget.limit}) is exhausted and this connection held {held} bytes "
            "of an unfinished frame"
        )
        self.abort("evicted for buffer budget")

    def _budget_log(self, kind: str, text: str) -> None:
        self._warn(text)

    # ---- hooks ------------------------------------------------------------------------------

    def _handshake_failed(self, problem: str) -> None:
        """Default: log, answer with Reject, close."""
        self._warn(f"{problem}; closing the connection")
        self.reject("protocol error: expected a valid hello")

    def _handle(self, msg: Any) -> None:
        raise NotImplementedError

    def _on_closed(self, exc: Exception | None) -> None:
        raise NotImplementedError
