"""Recordings of what the controller observed, and replaying them through the core.

A leader started with `controller_record = FILE` (node config; `aether node --controller-record
FILE`) appends every `Observation` it feeds its core to FILE, one JSON document per line (at most
`MAX_RECORDING_BYTES`; then it stops recording and logs it once). `replay` feeds such a file to a
fresh `Controller` with any configuration: `aether controller replay FILE [--config TOML]` shows
what that configuration would have decided on the load that was observed. The replay is open
loop: the recorded counts and metrics do not respond to the replayed decisions, so it answers
"when and how would it have reacted" up to the first decision that differs, not what the cluster
would have done afterwards.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import msgspec

from aether.controller.config import ControllerConfig
from aether.controller.core import Controller
from aether.controller.types import Decision, Observation
from aether.core.errors import BadRequest

__all__ = ["MAX_RECORDING_BYTES", "ObservationRecorder", "read_recording", "replay"]

MAX_RECORDING_BYTES = 256 * 1024 * 1024

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Observation)


class ObservationRecorder:
    """Appends observations to a JSON-lines file, up to `max_bytes`."""

    def __init__(self, path: str | Path, *, max_bytes: int = MAX_RECORDING_BYTES,
                 logger: logging.Logger | None = None) -> None:  # fmt: skip
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.log = logger or logging.getLogger("aether.controller.recording")
        self._file: IO[bytes] | None = None
        self.written = 0
        self.full = False

    def add(self, obs: Observation) -> None:
        if self.full:
            return
        line = _encoder.encode(obs) + b"\n"
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("ab")
                self.written = self._file.tell()
            if self.written + len(line) > self.max_bytes:
                self.full = True
                self.log.warning("controller recording %s reached %d bytes: no longer recording",
                                 self.path, self.max_bytes)  # fmt: skip
                self.close()
                return
            self._file.write(line)
            self._file.flush()
            self.written += len(line)
        except OSError as e:
            self.full = True
            self.log.error("cannot record controller observations to %s: %s", self.path, e)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_recording(path: str | Path) -> Iterator[Observation]:
    """The observations of a recording (gzip-compressed when its name ends in ``.gz``), in order;
    `BadRequest` naming the line that does not parse."""
    p = Path(path)
    with (gzip.open(p, "rb") if p.suffix == ".gz" else p.open("rb")) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield _decoder.decode(line)
            except msgspec.DecodeError as e:
                raise BadRequest(f"{path}:{n}: not a controller observation: {e}") from None


def replay(observations: Iterable[Observation], config: ControllerConfig) -> list[Decision]:
    """Every decision a fresh controller with `config` makes on `observations`."""
    core = Controller(config)
    out: list[Decision] = []
    for obs in observations:
        out += core.step(obs)
    return out
