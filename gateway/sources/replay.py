"""Recorded traces through python-can's LogReader: candump .log, Vector .asc/.blf, PCAN .trc, .csv,
.mf4 (with asammdf) and gzip-compressed variants python-can reads.

Trace timestamps are measurement time and are kept. Pacing is real time scaled by ``speed``
(``speed = 0``: as fast as possible). A trace that cannot be read, or that holds no frame at all, is
an error naming the file.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import can
import structlog

from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.model import Frame
from gateway.sources.base import FrameQueue, Source, frame_from_message

log = structlog.get_logger(__name__)

_BATCH = 2048


def check_trace(path: Path) -> None:
    """Fail early, naming the file, when a trace is missing or of a format nothing reads."""
    if not path.is_file():
        raise ConfigError("trace file not found", path=str(path))
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    known = set(can.io.player.MESSAGE_READERS)
    if not suffixes or suffixes[-1] not in known:
        raise ConfigError(f"unknown trace format (python-can reads {', '.join(sorted(known))}, "
                          f"optionally .gz)", path=str(path))
    if suffixes[-1] == ".mf4" and importlib.util.find_spec("asammdf") is None:
        raise ConfigError("reading .mf4 traces needs asammdf: pip install 'bms-gateway[mf4]'",
                          path=str(path))


class ReplaySource(Source):
    blocking = True

    def __init__(self, queue: FrameQueue, metrics: Metrics, *, files: Sequence[str | Path],
                 speed: float = 1.0) -> None:
        super().__init__(queue, metrics)
        self.files = [Path(f) for f in files]
        self.speed = speed
        self._messages: Iterator[tuple[Path, can.Message]] | None = None
        self._t0_trace: float | None = None
        self._t0_wall = 0.0
        self.frames_per_file: dict[str, int] = {}

    def describe(self) -> str:
        return f"replay of {len(self.files)} trace(s)"

    def _open(self) -> None:
        for path in self.files:
            check_trace(path)
        self._messages = self._read_all()

    def _read_all(self) -> Iterator[tuple[Path, can.Message]]:
        for path in self.files:
            count = 0
            log.info("replay_started", file=str(path))
            try:
                with can.LogReader(path) as reader:
                    for msg in reader:
                        count += 1
                        yield path, msg
            except (ValueError, OSError, EOFError, can.CanError) as exc:
                raise ConfigError(f"cannot read trace after {count} frames: {exc}",
                                  path=str(path)) from exc
            self.frames_per_file[str(path)] = count
            if count == 0:
                raise ConfigError("the trace holds no CAN frame", path=str(path))
            log.info("replay_finished", file=str(path), frames=count)

    def _receive(self, stop: threading.Event) -> list[Frame] | None:
        assert self._messages is not None
        frames: list[Frame] = []
        for _path, msg in self._messages:
            frames.append(frame_from_message(msg))
            if self.speed > 0 and self._pace(msg.timestamp, stop):
                return frames
            if len(frames) >= _BATCH:
                return frames
        return frames or None

    def _pace(self, ts: float, stop: threading.Event) -> bool:
        """Sleep until a frame's trace time is due; True when the batch should go now."""
        if self._t0_trace is None:
            self._t0_trace, self._t0_wall = ts, time.monotonic()
            return False
        due = self._t0_wall + (ts - self._t0_trace) / self.speed
        delay = due - time.monotonic()
        if delay > 0.02:
            stop.wait(delay)
            return True
        return False

    def _close(self) -> None:
        self._messages = None
