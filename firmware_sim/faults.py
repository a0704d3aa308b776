"""Fault injection, in two places.

*Value faults* change what the primary pack's BMS reports before it is encoded: a stuck cell
sensor (frozen at its value when the fault starts, optionally noticed by the firmware) and
out-of-range values. *Bus faults* act on the frames on the bus: dropped frames and corrupted
payloads (any pack's frames), error frames, and bus-off periods of the primary BMS (one bus-off
error frame, then silence). Each fault draws from its own random stream, so adding one fault does
not change what another does. A fault is active for frames whose physics step lies in
``[start_s, start_s + duration_s)``; no duration means until the end.

The duplicate-serial fault is a second pack and lives in :mod:`firmware_sim.simulator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from firmware_sim.frames import (
    CAN_ERR_BUSERROR,
    CAN_ERR_BUSOFF,
    CAN_ERR_PROT,
    FLAG_ERROR,
    FLAG_EXTENDED,
    KIND_INJECTED,
    FrameBatch,
)
from firmware_sim.scenario import (
    FRAME_NAMES,
    BusOffFault,
    CorruptedPayloadFault,
    DroppedFramesFault,
    ErrorFramesFault,
    Fault,
    OutOfRangeFault,
    StuckCellFault,
)

FloatArray = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_FOREVER = 1 << 62


@dataclass(frozen=True, slots=True)
class Window:
    start: int  # first physics step
    end: int  # first step after

    @staticmethod
    def of(fault: Fault, dt: float) -> Window:
        start = round(fault.start_s / dt)
        end = _FOREVER if fault.duration_s is None else start + round(fault.duration_s / dt)
        return Window(start, end)

    def mask(self, steps: I64) -> BoolArray:
        result: BoolArray = (steps >= self.start) & (steps < self.end)
        return result


class ValueFaults:
    """Stuck sensors and out-of-range values of the primary pack."""

    def __init__(self, faults: tuple[Fault, ...], dt: float) -> None:
        self._stuck = [(Window.of(f, dt), f) for f in faults if isinstance(f, StuckCellFault)]
        self._frozen: dict[int, float] = {}  # per stuck fault, the value it froze at
        self._ranges = [(Window.of(f, dt), f) for f in faults if isinstance(f, OutOfRangeFault)]

    def _ranged(self, signal: str) -> list[tuple[Window, OutOfRangeFault]]:
        return [(w, f) for w, f in self._ranges if f.signal == signal]

    def cells(self, steps: I64, measured: FloatArray) -> BoolArray:
        """Apply to measured cell voltages (rows = ``steps``) in place; return the invalid mask
        the firmware reports."""
        invalid = np.zeros(measured.shape, dtype=np.bool_)
        for n, (window, fault) in enumerate(self._stuck):
            active = window.mask(steps)
            if not active.any():
                continue
            if n not in self._frozen:
                self._frozen[n] = float(measured[np.argmax(active), fault.cell])
            measured[active, fault.cell] = self._frozen[n]
            if fault.flagged:
                invalid[active, fault.cell] = True
        for window, ranged in self._ranged("cell_voltage"):
            measured[window.mask(steps), ranged.index] = ranged.value
        return invalid

    def sensor_fault(self, steps: I64) -> BoolArray:
        """Steps at which the firmware reports a sensor fault (a noticed stuck sensor)."""
        flag = np.zeros(len(steps), dtype=np.bool_)
        for window, fault in self._stuck:
            if fault.flagged:
                flag |= window.mask(steps)
        return flag

    def temps(self, steps: I64, measured: FloatArray) -> None:
        for window, fault in self._ranged("cell_temp"):
            measured[window.mask(steps), fault.index] = fault.value

    def scalar(self, signal: str, steps: I64, measured: FloatArray) -> None:
        """``current`` or ``pack_voltage``."""
        for window, fault in self._ranged(signal):
            measured[window.mask(steps)] = fault.value


class BusFaults:
    """Frame-level faults on the merged bus traffic of one chunk."""

    def __init__(self, faults: tuple[Fault, ...], dt: float, start_us: int, primary_node: int,
                 seed: int) -> None:
        self._dt_us = round(dt * 1e6)
        self._start_us = start_us
        self._node = primary_node
        self._faults = []
        for index, fault in enumerate(faults):
            if isinstance(fault, DroppedFramesFault | CorruptedPayloadFault | ErrorFramesFault
                          | BusOffFault):
                rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(100, index)))
                self._faults.append((Window.of(fault, dt), fault, rng))

    def _selected(self, batch: FrameBatch, window: Window, names: tuple[str, ...]) -> BoolArray:
        mask: BoolArray = window.mask(batch.step) & (batch.kind != KIND_INJECTED)
        if names:
            kinds = [FRAME_NAMES.index(n) for n in names]
            mask &= np.isin(batch.kind, kinds)
        return mask

    def _error_frames(self, times: I64, error_class: int, data2: int) -> FrameBatch:
        n = len(times)
        data = np.zeros((n, 8), dtype=np.uint8)
        data[:, 2] = data2
        return FrameBatch(times, np.full(n, error_class, np.uint32), data,
                          np.full(n, 8, np.uint8), np.full(n, FLAG_ERROR | FLAG_EXTENDED, np.uint8),
                          np.full(n, KIND_INJECTED, np.uint8),
                          (times - self._start_us) // self._dt_us)

    def apply(self, batch: FrameBatch, k0: int, k1: int) -> FrameBatch:
        """The chunk's frames (steps ``k0``..``k1``) with every active fault applied."""
        if not self._faults:
            return batch
        added: list[FrameBatch] = []
        data = batch.data.copy()
        dlc = batch.dlc.copy()
        keep = np.ones(len(batch), dtype=np.bool_)
        for window, fault, rng in self._faults:
            if window.end <= k0 or window.start >= k1:
                continue
            if isinstance(fault, BusOffFault):
                own = window.mask(batch.step) & ((batch.can_id & 0xF) == self._node) \
                    & (batch.kind != KIND_INJECTED)
                keep &= ~own
                if k0 <= window.start < k1:
                    at = np.array([self._start_us + window.start * self._dt_us], dtype=np.int64)
                    added.append(self._error_frames(at, CAN_ERR_BUSOFF | CAN_ERR_BUSERROR, 0))
            elif isinstance(fault, DroppedFramesFault):
                chosen = self._selected(batch, window, fault.messages)
                keep &= ~(chosen & (rng.random(len(batch)) < fault.probability))
            elif isinstance(fault, CorruptedPayloadFault):
                chosen = self._selected(batch, window, fault.messages)
                hit = np.flatnonzero(chosen & (rng.random(len(batch)) < fault.probability))
                if fault.mode == "bitflip":
                    byte = rng.integers(0, 8, len(hit))
                    bit = rng.integers(0, 8, len(hit)).astype(np.uint8)
                    data[hit, byte] ^= np.left_shift(np.uint8(1), bit)
                elif fault.mode == "random":
                    data[hit] = rng.integers(0, 256, (len(hit), 8), dtype=np.uint8)
                else:
                    dlc[hit] = rng.integers(0, 8, len(hit), dtype=np.uint8)
            else:
                assert isinstance(fault, ErrorFramesFault)
                lo = max(k0, window.start) * self._dt_us
                hi = min(k1, window.end) * self._dt_us
                count = rng.poisson(fault.rate_hz * (hi - lo) / 1e6)
                times = np.sort(rng.integers(lo, hi, count)) + self._start_us
                added.append(self._error_frames(times, CAN_ERR_PROT | CAN_ERR_BUSERROR, 0x08))
        changed = FrameBatch(batch.t_us, batch.can_id, data, dlc, batch.flags, batch.kind,
                             batch.step).take(keep)
        return FrameBatch.concat([changed, *added]) if added else changed
