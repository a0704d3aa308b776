"""Trace files: candump ``.log`` written from columns, ``.asc`` and ``.blf`` through python-can's
own writers, and the ground-truth JSON lines.

The candump writer builds whole chunks of lines as a byte matrix (one row per frame, fixed width
for the common 11-bit, 8-byte data frame) from precomputed digits, because python-can's
per-message writer would take most of the time budget on its own. Rows that are not plain 8-byte
standard frames (error frames, truncated payloads) are formatted one by one and spliced in at
their place. The output is ``candump -L`` format: ``(1767225600.000250) can0 520#00A49C...``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import can
import numpy as np
import numpy.typing as npt

from firmware_sim.frames import CAN_ERR_FLAG, FLAG_ERROR, FLAG_EXTENDED, FrameBatch

TRACE_SUFFIXES = (".log", ".asc", ".blf")
_HEX = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)


def _digits(values: npt.NDArray[np.int64], width: int) -> npt.NDArray[np.uint8]:
    """(n, width) ASCII decimal digits, zero-padded."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    result: npt.NDArray[np.uint8] = ((values[:, None] // powers) % 10 + 48).astype(np.uint8)
    return result


def _slow_line(batch: FrameBatch, i: int, channel: str) -> bytes:
    sec, usec = divmod(int(batch.t_us[i]), 1_000_000)
    flags = int(batch.flags[i])
    can_id = int(batch.can_id[i])
    if flags & FLAG_ERROR:
        ident = f"{CAN_ERR_FLAG | can_id:08X}"
    elif flags & FLAG_EXTENDED:
        ident = f"{can_id:08X}"
    else:
        ident = f"{can_id:03X}"
    data = batch.data[i, :int(batch.dlc[i])].tobytes().hex().upper()
    return f"({sec:010d}.{usec:06d}) {channel} {ident}#{data}\n".encode("ascii")


def candump_bytes(batch: FrameBatch, channel: str) -> bytes:
    """The batch as ``candump -L`` lines."""
    n = len(batch)
    if n == 0:
        return b""
    plain = (batch.dlc == 8) & (batch.flags == 0) & (batch.can_id < 0x800)
    rows = batch.take(plain) if not plain.all() else batch
    sec, usec = np.divmod(rows.t_us, 1_000_000)
    sec_width = max(10, len(str(int(sec.max()))) if len(sec) else 10)
    chan = channel.encode("ascii")
    head = 1 + sec_width + 1 + 6 + 2  # "(" sec "." usec ") "
    width = head + len(chan) + 1 + 3 + 1 + 16 + 1
    out = np.empty((len(rows), width), dtype=np.uint8)
    out[:, 0] = ord("(")
    out[:, 1:1 + sec_width] = _digits(sec, sec_width)
    out[:, 1 + sec_width] = ord(".")
    out[:, 2 + sec_width:8 + sec_width] = _digits(usec, 6)
    out[:, 8 + sec_width] = ord(")")
    out[:, 9 + sec_width] = ord(" ")
    col = head
    out[:, col:col + len(chan)] = np.frombuffer(chan, dtype=np.uint8)
    col += len(chan)
    out[:, col] = ord(" ")
    ids = rows.can_id.astype(np.int64)
    for j, shift in enumerate((8, 4, 0)):
        out[:, col + 1 + j] = _HEX[(ids >> shift) & 0xF]
    out[:, col + 4] = ord("#")
    out[:, col + 5:col + 21:2] = _HEX[rows.data >> 4]
    out[:, col + 6:col + 22:2] = _HEX[rows.data & 0xF]
    out[:, -1] = ord("\n")
    if plain.all():
        return out.tobytes()
    pieces = []
    done = 0  # plain rows written so far
    for j, i in enumerate(np.flatnonzero(~plain).tolist()):
        before = i - j  # plain rows before frame i
        pieces.append(out[done:before].tobytes())
        pieces.append(_slow_line(batch, i, channel))
        done = before
    pieces.append(out[done:].tobytes())
    return b"".join(pieces)


class TraceWriter:
    """Writes batches to a trace file whose format follows the suffix."""

    def __init__(self, path: Path, channel: str = "can0") -> None:
        suffix = path.suffix.lower()
        if suffix not in TRACE_SUFFIXES:
            raise ValueError(f"{path}: trace format follows the suffix, one of "
                             f"{', '.join(TRACE_SUFFIXES)}")
        self.path = path
        self.channel = channel
        self.frames = 0
        self._raw: IO[bytes] | None = None
        self._logger: Any = None
        if suffix == ".log":
            self._raw = path.open("wb")
        else:
            self._logger = can.Logger(str(path))

    def write(self, batch: FrameBatch) -> None:
        self.frames += len(batch)
        if self._raw is not None:
            self._raw.write(candump_bytes(batch, self.channel))
        else:
            for msg in batch.messages(self.channel):
                self._logger.on_message_received(msg)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self._logger is not None:
            self._logger.stop()
            self._logger = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class TruthWriter:
    """Ground truth as JSON lines, one object per pack and instant."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", encoding="utf-8")
        self.lines = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.lines += 1

    def close(self) -> None:
        self._file.close()


def read_truth(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a truth file, in order."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.strip():
                yield json.loads(line)

