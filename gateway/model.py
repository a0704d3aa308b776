"""Plain data passed between the stages. Frozen, slotted, and free of behaviour.

Units are SI (V, A, °C, s, Ah, Wh) and carry the unit in the field name where it is not obvious.
Time is POSIX seconds (UTC) as a float: a frame keeps its source's receive timestamp, a sample and
a record keep measurement time, never publish time.

Current sign convention, everywhere past the profile: **positive while discharging**.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(slots=True)
class Frame:
    """One CAN frame as a source received it. Treat it as immutable.

    Not ``frozen``: one is built for every frame on the bus, and a frozen dataclass's ``__init__``
    (``object.__setattr__`` per field) costs twice as much, about 1 µs a frame measured here.
    """

    ts: float
    can_id: int
    data: bytes
    is_extended: bool = False
    is_fd: bool = False
    is_error: bool = False
    is_remote: bool = False
    channel: str = ""


@dataclass(frozen=True, slots=True)
class Sample:
    """One complete cycle of one pack's measurements, on the canonical pack model.

    Per-cell arrays are ``None`` when the BMS does not send per-cell values (min/max only); they
    are never invented. ``cell_voltage_valid[i]`` is False where the BMS flagged cell i invalid,
    where it was not received this cycle, or where it was physically implausible (those are also
    counted).
    Scalars that the BMS did not send are ``nan``.
    """

    serial: str
    ts: float
    current_a: float
    pack_voltage_v: float
    bms_soc_pct: float
    state: str
    fault_flags: int
    cell_voltages_v: FloatArray | None
    cell_voltage_valid: BoolArray | None
    cell_temps_c: FloatArray | None
    cell_temp_valid: BoolArray | None
    min_cell_voltage_v: float = float("nan")
    max_cell_voltage_v: float = float("nan")
    min_cell_temp_c: float = float("nan")
    max_cell_temp_c: float = float("nan")
    rated_capacity_ah: float = float("nan")
    chemistry: str = ""


class RecordKind(enum.StrEnum):
    """What a record is; also the last element of its MQTT topic."""

    TELEMETRY = "telemetry"
    HEALTH = "health"
    EVENTS = "events"


#: Drop priority under store quota pressure: lower is dropped first.
KIND_PRIORITY: Mapping[RecordKind, int] = {
    RecordKind.TELEMETRY: 0,
    RecordKind.HEALTH: 1,
    RecordKind.EVENTS: 2,
}


@dataclass(frozen=True, slots=True)
class Record:
    """A record produced by the edge core, before the store gives it a ``seq``.

    ``body`` holds the figures, JSON-ready (floats, ints, strings, lists, dicts; no NaN — absent
    figures are left out or None).
    """

    serial: str
    kind: RecordKind
    ts: float
    body: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A committed record: ``seq`` is the store's monotonic id, never reused."""

    seq: int
    serial: str
    kind: RecordKind
    ts: float
    body: Mapping[str, Any]
    attempts: int = 0
