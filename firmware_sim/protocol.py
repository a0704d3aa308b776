"""The reference protocol (``dbc/bms_reference.dbc``), compiled once for vectorised encoding.

cantools loads the DBC and is the authority on every signal's layout (start bit, length, sign,
scale, offset). Encoding a million frames one ``encode_message`` call at a time costs tens of
seconds, so each message is compiled into a list of :class:`SignalCodec` and whole arrays of
values are packed into 64-bit payloads with a handful of NumPy operations. Rounding is NumPy's
half-to-even, the same as cantools' ``round``; a value beyond what the field can carry is
clipped to the field (the DBC's min/max are not enforced: out-of-range faults need to send
them). Frames that never change (identity, info) are encoded by cantools itself, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import cantools
import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]

#: base frame ids of node 0; node k sends base + k
BASE_IDS = {
    "BMS_PackStatus": 0x500,
    "BMS_CellStats": 0x510,
    "BMS_CellVoltages": 0x520,
    "BMS_CellTemperatures": 0x530,
    "BMS_Balancing": 0x540,
    "BMS_Identity": 0x550,
    "BMS_Info": 0x560,
}


def load_dbc(path: Path) -> cantools.database.can.Database:
    """A CAN database through cantools (a DBC file, never a diagnostics database)."""
    db = cantools.database.load_file(str(path))
    if not isinstance(db, cantools.database.can.Database):
        raise ValueError(f"{path}: not a CAN database")
    return db


def reference_dbc_path() -> Path:
    """The reference DBC: ``dbc/bms_reference.dbc`` beside the package in the repository."""
    here = Path(str(resources.files("firmware_sim")))
    return here.parent / "dbc" / "bms_reference.dbc"


@dataclass(frozen=True, slots=True)
class SignalCodec:
    name: str
    start: int
    length: int
    signed: bool
    scale: float
    offset: float

    @property
    def raw_min(self) -> int:
        return -(1 << (self.length - 1)) if self.signed else 0

    @property
    def raw_max(self) -> int:
        return (1 << (self.length - 1)) - 1 if self.signed else (1 << self.length) - 1

    def raw(self, values: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Physical values → raw field values (clipped to the field)."""
        arr = np.asarray(values)
        if arr.dtype.kind in "iu" and self.scale == 1 and self.offset == 0:
            raw = arr.astype(np.int64)  # exact, also for 56-bit integers
        else:  # clipped while still float, so that no value overflows the conversion
            raw = np.rint((arr.astype(np.float64) - self.offset) / self.scale)
        result: npt.NDArray[np.int64] = np.clip(raw, self.raw_min, self.raw_max).astype(np.int64)
        return result

    def pack(self, values: npt.ArrayLike) -> U64:
        mask = np.int64((1 << self.length) - 1)
        field: U64 = ((self.raw(values) & mask).astype(np.uint64)
                      << np.uint64(self.start))
        return field


@dataclass(frozen=True, slots=True)
class MessageCodec:
    name: str
    frame_id: int
    signals: dict[str, SignalCodec]

    def pack(self, count: int, **values: npt.ArrayLike) -> U64:
        """``count`` payloads (as little-endian uint64) from arrays or scalars per signal;
        a signal left out is 0."""
        unknown = set(values) - set(self.signals)
        if unknown:
            raise KeyError(f"{self.name} has no signal {sorted(unknown)[0]}")
        payload = np.zeros(count, dtype=np.uint64)
        for name, value in values.items():
            payload |= self.signals[name].pack(value)
        return payload


class Protocol:
    """The compiled reference DBC."""

    def __init__(self, dbc_path: Path | None = None) -> None:
        self.path = dbc_path or reference_dbc_path()
        self.db = load_dbc(self.path)
        self.messages: dict[str, MessageCodec] = {}
        for name, frame_id in BASE_IDS.items():
            message = self.db.get_message_by_name(name)
            if message.frame_id != frame_id or message.length != 8:
                raise ValueError(f"{self.path}: {name} must be id {frame_id:#x}, 8 bytes")
            codecs = {}
            for sig in message.signals:
                if sig.byte_order != "little_endian" or sig.is_float or sig.is_multiplexer:
                    raise ValueError(f"{self.path}: {name}.{sig.name} must be a plain "
                                     "little-endian integer signal")
                codecs[sig.name] = SignalCodec(sig.name, sig.start, sig.length, sig.is_signed,
                                               float(sig.scale), float(sig.offset))
            self.messages[name] = MessageCodec(name, frame_id, codecs)

    def encode(self, name: str, values: dict[str, int | float]) -> bytes:
        """One payload through cantools itself (constant frames)."""
        data: bytes = self.db.get_message_by_name(name).encode(values)
        return data


_SHARED: Protocol | None = None


def shared_protocol() -> Protocol:
    """The reference protocol, loaded once per process."""
    global _SHARED
    if _SHARED is None:
        _SHARED = Protocol()
    return _SHARED


def payload_bytes(payload: U64) -> npt.NDArray[np.uint8]:
    """uint64 payloads → (n, 8) bytes, byte 0 first (the DBC's little-endian layout)."""
    result: npt.NDArray[np.uint8] = payload.astype("<u8").view(np.uint8).reshape(-1, 8)
    return result
