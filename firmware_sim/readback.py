"""Reading the simulator's traffic back through cantools, independently of the encoder.

Tests, the benchmark and anyone checking a trace by hand use this to see what a receiver sees:
frames decoded by cantools from the DBC file, grouped by message and node, and cell-voltage
cycles reassembled into a matrix (the protocol sends block 0 first, so block 0 opens a cycle).
"""

from __future__ import annotations

import typing
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
import cantools
import numpy as np
import numpy.typing as npt

from firmware_sim.protocol import BASE_IDS, load_dbc, reference_dbc_path

_BY_BASE = {base: name for name, base in BASE_IDS.items()}


@dataclass(frozen=True, slots=True)
class DecodedFrame:
    ts: float
    signals: dict[str, Any]


@dataclass(slots=True)
class Readback:
    """Decoded traffic: ``frames[(name, node_id)]`` in order, plus what did not decode."""

    frames: dict[tuple[str, int], list[DecodedFrame]] = field(
        default_factory=lambda: defaultdict(list))
    error_frames: list[can.Message] = field(default_factory=list)
    undecodable: list[can.Message] = field(default_factory=list)
    unknown: list[can.Message] = field(default_factory=list)

    def of(self, name: str, node_id: int = 0) -> list[DecodedFrame]:
        return self.frames.get((name, node_id), [])

    def signal(self, name: str, signal: str, node_id: int = 0) -> npt.NDArray[np.float64]:
        return np.array([float(f.signals[signal]) for f in self.of(name, node_id)])

    def times(self, name: str, node_id: int = 0) -> npt.NDArray[np.float64]:
        return np.array([f.ts for f in self.of(name, node_id)])

    def serial(self, node_id: int = 0) -> str:
        """The serial reassembled from the identity chunks (the last complete set)."""
        chunks: dict[int, bytes] = {}
        text = ""
        for f in self.of("BMS_Identity", node_id):
            index, count = int(f.signals["SerialChunkIndex"]), int(f.signals["SerialChunkCount"])
            chunks[index] = int(f.signals["SerialText"]).to_bytes(7, "little")
            if len(chunks) >= count and all(i in chunks for i in range(count)):
                text = b"".join(chunks[i] for i in range(count)).rstrip(b"\0").decode("ascii")
        return text

    def cell_voltages(self, cells: int, node_id: int = 0
                      ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """(time of each cycle's block 0, voltages (cycles, cells)); nan where a value is
        flagged invalid or its frame is missing."""
        times: list[float] = []
        rows: list[npt.NDArray[np.float64]] = []
        for f in self.of("BMS_CellVoltages", node_id):
            block = int(f.signals["CellVoltageBlock"])
            if block == 0:
                times.append(f.ts)
                rows.append(np.full(cells, np.nan))
            if not rows:
                continue
            invalid = int(f.signals["CellVoltageInvalid"])
            for j in range(3):
                cell = block * 3 + j
                if cell < cells and not invalid >> j & 1:
                    rows[-1][cell] = float(f.signals[f"CellVoltage{j}"])
        return np.array(times), np.array(rows).reshape(len(rows), cells)


def read_back(messages: Iterable[can.Message], dbc_path: Path | None = None) -> Readback:
    """Decode every frame with cantools (choices as plain numbers)."""
    db = load_dbc(dbc_path or reference_dbc_path())
    out = Readback()
    for msg in messages:
        if msg.is_error_frame:
            out.error_frames.append(msg)
            continue
        name = _BY_BASE.get(msg.arbitration_id & ~0xF) if not msg.is_extended_id else None
        if name is None:
            out.unknown.append(msg)
            continue
        try:
            signals = db.decode_message(msg.arbitration_id & ~0xF, bytes(msg.data),
                                        decode_choices=False)
        except cantools.database.errors.DecodeError:
            out.undecodable.append(msg)
            continue
        out.frames[(name, msg.arbitration_id & 0xF)].append(
            DecodedFrame(msg.timestamp, dict(typing.cast(dict[str, Any], signals))))
    return out
