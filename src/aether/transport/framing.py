"""Length-prefixed framing (pure, sans-IO).

A frame on the wire is a 4-byte big-endian unsigned payload length followed by the payload.
`encode_frame` builds one frame; `FrameDecoder` turns an arbitrary split byte stream back into
payloads. Neither does any I/O, so both are usable from asyncio protocols, simulations and tests.
"""

from __future__ import annotations

import struct

from aether.core.errors import AetherError

__all__ = [
    "DEFAULT_MAX_FRAME", "HEADER_SIZE", "MAX_PAYLOAD", "FrameDecoder", "FrameTooLarge", "encode_frame",
    "frame_header",
]  # fmt: skip

DEFAULT_MAX_FRAME = 16 * 1024 * 1024
"""Largest payload accepted by default (16 MiB)."""

HEADER_SIZE = 4

_HEADER = struct.Struct(">I")
MAX_PAYLOAD = 0xFFFFFFFF
"""The largest payload a 4-byte length prefix can announce."""

frame_header = _HEADER.pack
"""``frame_header(size)``: the 4-byte length prefix of a payload of `size` bytes (<= MAX_PAYLOAD)."""

# Compact the receive buffer once this many consumed bytes sit at its front. Between compactions
# frames are parsed at an offset, so a stream of small frames costs O(total bytes), not O(n^2).
_COMPACT_THRESHOLD = 64 * 1024


class FrameTooLarge(AetherError, ValueError):
    """A frame header announced a payload larger than the decoder's limit.

    Raised as soon as the header is seen; the payload is never buffered. The stream can not be
    resynchronised after this, so the connection carrying it must be closed. ``frames`` holds the
    complete payloads that preceded the bad header in the same ``feed`` call (they are valid).
    """

    def __init__(self, size: int, limit: int, frames: list[bytes] | None = None) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit
        self.frames: list[bytes] = frames if frames is not None else []


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """Return `payload` prefixed with its 4-byte big-endian length."""
    size = len(payload)
    if size > MAX_PAYLOAD:
        raise ValueError(f"payload of {size} bytes does not fit a 4-byte length prefix")
    return _HEADER.pack(size) + bytes(payload)


class FrameDecoder:
    """Incremental frame parser: feed it bytes as they arrive, get back complete payloads.

    ``feed`` returns the payloads completed by that chunk (possibly none) in stream order and keeps
    any partial frame buffered. It raises `FrameTooLarge` as soon as a header announces more than
    ``max_frame`` bytes (frames completed earlier in the same chunk travel on the exception); after
    that the decoder is poisoned and raises again on every feed.
    """

    __slots__ = ("_broken", "_buf", "_max_frame", "_pos")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 0:
            raise ValueError("max_frame must be >= 0")
        self._max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0
        self._broken: FrameTooLarge | None = None

    @property
    def max_frame(self) -> int:
        """The largest payload this decoder accepts (may be raised, e.g. once a peer authenticated)."""
        return self._max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        if value < 0:
            raise ValueError("max_frame must be >= 0")
        self._max_frame = value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a complete frame."""
        return len(self._buf) - self._pos

    @property
    def pending(self) -> int:
        """Bytes the unfinished frame occupies once complete: its header plus the payload that header
        announces, or, before the 4-byte header is complete, the bytes of it received so far; 0 when
        nothing is buffered. Never less than `buffered` (a buffer budget can reserve this up front)."""
        have = len(self._buf) - self._pos
        if have < HEADER_SIZE:
            return have
        (size,) = _HEADER.unpack_from(self._buf, self._pos)
        return HEADER_SIZE + size

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Consume `data`; return every payload it completes, in order."""
        if self._broken is not None:
            raise self._broken
        frames: list[bytes] = []
        if not data:
            return frames
        buf = self._buf
        if self._pos == len(buf):
            # Fast path: nothing buffered, parse straight out of `data` and keep only the tail.
            if buf:
                buf.clear()
            self._pos = 0
            with memoryview(data) as view:
                pos = self._parse(view, 0, frames)
                if pos < len(view):
                    buf += view[pos:]
            return frames
        buf += data
        with memoryview(buf) as view:
            pos = self._parse(view, self._pos, frames)
        if pos == len(buf):
            buf.clear()
            pos = 0
        elif pos >= _COMPACT_THRESHOLD:
            del buf[:pos]
            pos = 0
        self._pos = pos
        return frames

    def _parse(self, buf: memoryview, pos: int, frames: list[bytes]) -> int:
        end = len(buf)
        limit = self._max_frame
        unpack_from = _HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            (size,) = unpack_from(buf, pos)
            if size > limit:
                self._broken = FrameTooLarge(size, limit)
                self._buf = bytearray()
                self._pos = 0
                raise FrameTooLarge(size, limit, frames)
            stop = pos + HEADER_SIZE + size
            if stop > end:
                break
            frames.append(bytes(buf[pos + HEADER_SIZE : stop]))
            pos = stop
        return pos
