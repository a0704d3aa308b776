"""Frames as columns: a chunk of simulated bus traffic is a handful of NumPy arrays, not a list of
``can.Message``. Writers and fault injection work on whole columns; a ``can.Message`` is only
made when someone asks for one (:meth:`FrameBatch.messages`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import can
import numpy as np
import numpy.typing as npt

I64 = npt.NDArray[np.int64]

FLAG_ERROR = 1
FLAG_EXTENDED = 2

#: frame-kind code of frames the fault injector adds (error frames)
KIND_INJECTED = 255

# Linux SocketCAN error frame ids (linux/can/error.h); the candump reader of python-can
# recognises an error frame by CAN_ERR_FLAG together with CAN_ERR_BUSERROR.
CAN_ERR_FLAG = 0x20000000
CAN_ERR_PROT = 0x00000008
CAN_ERR_BUSOFF = 0x00000040
CAN_ERR_BUSERROR = 0x00000080


@dataclass(frozen=True, slots=True)
class FrameBatch:
    """Frames in time order. ``t_us`` is POSIX time in integer microseconds (exact, so the same
    seed gives the same bytes); ``step`` is the physics step whose sample the frame reports."""

    t_us: I64
    can_id: npt.NDArray[np.uint32]
    data: npt.NDArray[np.uint8]  # (n, 8); bytes past dlc are ignored
    dlc: npt.NDArray[np.uint8]
    flags: npt.NDArray[np.uint8]
    kind: npt.NDArray[np.uint8]  # index into scenario.FRAME_NAMES, or KIND_INJECTED
    step: I64

    def __len__(self) -> int:
        return len(self.t_us)

    @staticmethod
    def empty() -> FrameBatch:
        return FrameBatch(np.zeros(0, np.int64), np.zeros(0, np.uint32),
                          np.zeros((0, 8), np.uint8), np.zeros(0, np.uint8),
                          np.zeros(0, np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.int64))

    def take(self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_] | slice) -> FrameBatch:
        return FrameBatch(self.t_us[index], self.can_id[index], self.data[index],
                          self.dlc[index], self.flags[index], self.kind[index], self.step[index])

    @staticmethod
    def concat(batches: Sequence[FrameBatch]) -> FrameBatch:
        """Concatenated and sorted by time; equal times keep the order of ``batches``."""
        if len(batches) == 1:
            return batches[0]
        joined = FrameBatch(*(np.concatenate([getattr(b, name) for b in batches])
                              for name in FrameBatch.__slots__))
        order = np.argsort(joined.t_us, kind="stable")
        return joined.take(order)

    def messages(self, channel: str | None = None) -> Iterator[can.Message]:
        """One ``can.Message`` per frame (timestamp in POSIX seconds)."""
        t_s = self.t_us / 1e6
        ids = self.can_id.tolist()
        dlcs = self.dlc.tolist()
        flags = self.flags.tolist()
        rows = self.data.tobytes()
        for i, ts in enumerate(t_s.tolist()):
            dlc = dlcs[i]
            yield can.Message(
                timestamp=ts,
                arbitration_id=ids[i],
                is_extended_id=bool(flags[i] & (FLAG_EXTENDED | FLAG_ERROR)),
                is_error_frame=bool(flags[i] & FLAG_ERROR),
                dlc=dlc,
                data=rows[i * 8:i * 8 + dlc],
                channel=channel,
                check=False,
            )
