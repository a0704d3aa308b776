"""Per-pack estimator state of the edge core, and its checkpoint format.

The state is everything the edge core needs to continue a pack exactly where it left off: the last
accepted sample (throughput and resistance steps span batch boundaries), the lifetime counters,
the resistance estimates, the reporting-interval grid and the event debouncers. It is checkpointed
as bytes into the store in the same transaction as the records it produced, under
``edge/<serial>``.

Format: an uncompressed ``.npz`` archive (``np.savez``) of named arrays, scalars as 0-d arrays, with
``version``. Floats are stored bit-exact, so a restored pack continues with exactly the same
totals as an uninterrupted run. To add a field in a later version: give it a default in
:meth:`PackState.new`, add it to the archive, and leave ``from_bytes`` to keep the default when an
older checkpoint lacks the key. A checkpoint from a newer version, or one that does not decode, is
refused (:class:`CheckpointError`) rather than replaced by a fresh state: lifetime counters must
never go backwards.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.edge.kernels import THROUGHPUT_COLUMNS, IntArray
from gateway.errors import GatewayError
from gateway.model import BoolArray, FloatArray

STATE_VERSION = 1

#: How many of the latest accepted current steps each cell's R0 median is taken over. It is the
#: ring's width in the checkpoint: changing it needs a new ``STATE_VERSION`` that converts rings.
#: With it, a 192-cell pack's whole checkpoint is about 40 kB (the ring is 24.6 kB of it).
R0_WINDOW = 16

#: The value a debounced channel is assumed to have before the first sample: no fault flags set,
#: every cell and sensor valid (so a cell that is invalid from the start is reported once, like
#: one that fails later).
FAULTS_INITIAL, VALID_INITIAL = 0, 1

#: Debouncer prefixes in the archive.
_FAULTS, _CELL_VALIDITY, _TEMP_VALIDITY = "faults", "cell_validity", "temp_validity"


class CheckpointError(GatewayError, ValueError):
    """A pack's checkpoint cannot be restored (corrupt, inconsistent, or from a newer version).

    Raised at start-up instead of starting the pack from zero, which would send its lifetime
    counters backwards.
    """


@dataclass(slots=True, eq=False)
class DebounceState:
    """State of one group of debounced channels (see :func:`gateway.edge.kernels.debounce`).

    Mutable on purpose: the kernel updates these arrays in place.
    """

    reported: IntArray
    candidate: IntArray
    since: FloatArray

    @classmethod
    def fresh(cls, channels: int, initial: int) -> DebounceState:
        return cls(reported=np.full(channels, initial, np.int64),
                   candidate=np.full(channels, initial, np.int64),
                   since=np.full(channels, np.nan))

    @property
    def channels(self) -> int:
        return int(self.reported.shape[0])


@dataclass(slots=True, eq=False)
class PackState:
    """Everything the edge core keeps for one pack. Owned by the pipeline thread alone.

    Not frozen: the kernels update the arrays in place, batch after batch. Times are POSIX
    seconds; NaN means "not yet seen". Per-cell arrays have one entry per cell of the pack's
    current layout (zero when the BMS sends no per-cell voltages).
    """

    serial: str
    #: measurement time of the first accepted sample (origin of the health interval grid)
    first_ts: float
    #: the last accepted sample, the continuation row of the next batch
    last_ts: float
    last_current_a: float
    last_pack_voltage_v: float
    last_cell_voltages_v: FloatArray
    last_cell_valid: BoolArray
    #: lifetime throughput counters, columns as ``kernels.AH_CHARGE`` … ``kernels.WH_TOTAL``
    totals: FloatArray
    #: the rated capacity the BMS last sent (used when the configuration sets none)
    bus_rated_capacity_ah: float
    #: per cell, the latest ``R0_WINDOW`` accepted R0 estimates (Ω) and how many were accepted
    r0_ring: FloatArray
    r0_cell_steps: IntArray
    #: current steps that gave at least one cell an estimate
    r0_steps: int
    #: measurement time of the sample that produced the last telemetry / health record (the
    #: interval grid continues from it; the health grid starts at ``first_ts``)
    telemetry_tick_ts: float
    health_tick_ts: float
    faults: DebounceState
    cell_validity: DebounceState
    temp_validity: DebounceState

    @classmethod
    def new(cls, serial: str) -> PackState:
        return cls(
            serial=serial, first_ts=np.nan, last_ts=np.nan, last_current_a=np.nan,
            last_pack_voltage_v=np.nan, last_cell_voltages_v=np.empty(0),
            last_cell_valid=np.empty(0, np.bool_), totals=np.zeros(THROUGHPUT_COLUMNS),
            bus_rated_capacity_ah=np.nan, r0_ring=np.zeros((0, R0_WINDOW)),
            r0_cell_steps=np.zeros(0, np.int64), r0_steps=0,
            telemetry_tick_ts=-np.inf, health_tick_ts=np.nan,
            faults=DebounceState.fresh(1, FAULTS_INITIAL),
            cell_validity=DebounceState.fresh(0, VALID_INITIAL),
            temp_validity=DebounceState.fresh(0, VALID_INITIAL),
        )

    @property
    def cell_count(self) -> int:
        return int(self.last_cell_voltages_v.shape[0])

    @property
    def sensor_count(self) -> int:
        return self.temp_validity.channels

    def reset_cells(self, cells: int) -> None:
        """Start the per-cell state over for a new cell layout (index i is no longer the same cell).

        The pack-level step count stays: it counts the pack's history, not the layout's.
        """
        self.last_cell_voltages_v = np.full(cells, np.nan)
        self.last_cell_valid = np.zeros(cells, np.bool_)
        self.r0_ring = np.zeros((cells, R0_WINDOW))
        self.r0_cell_steps = np.zeros(cells, np.int64)
        self.cell_validity = DebounceState.fresh(cells, VALID_INITIAL)

    def reset_sensors(self, sensors: int) -> None:
        self.temp_validity = DebounceState.fresh(sensors, VALID_INITIAL)

    # -----------------------------------------------------------------------------------------
    # Checkpoint

    def to_bytes(self) -> bytes:
        arrays: dict[str, npt.ArrayLike] = {
            "version": np.int64(STATE_VERSION),
            "serial": np.str_(self.serial),
            "first_ts": np.float64(self.first_ts),
            "last_ts": np.float64(self.last_ts),
            "last_current_a": np.float64(self.last_current_a),
            "last_pack_voltage_v": np.float64(self.last_pack_voltage_v),
            "last_cell_voltages_v": self.last_cell_voltages_v,
            "last_cell_valid": self.last_cell_valid,
            "totals": self.totals,
            "bus_rated_capacity_ah": np.float64(self.bus_rated_capacity_ah),
            "r0_ring": self.r0_ring,
            "r0_cell_steps": self.r0_cell_steps,
            "r0_steps": np.int64(self.r0_steps),
            "telemetry_tick_ts": np.float64(self.telemetry_tick_ts),
            "health_tick_ts": np.float64(self.health_tick_ts),
        }
        for prefix, debouncer in self._debouncers():
            arrays[f"{prefix}.reported"] = debouncer.reported
            arrays[f"{prefix}.candidate"] = debouncer.candidate
            arrays[f"{prefix}.since"] = debouncer.since
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, serial: str) -> PackState:
        """Decode a checkpoint of ``serial``; raises :class:`CheckpointError`."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
                stored = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"checkpoint of pack {serial!r} does not decode: {exc}") from exc
        version = int(stored.get("version", -1))
        if not 1 <= version <= STATE_VERSION:
            raise CheckpointError(f"checkpoint of pack {serial!r} has version {version}; this "
                                  f"gateway reads versions 1 to {STATE_VERSION}")
        if str(stored.get("serial", "")) != serial:
            raise CheckpointError(f"checkpoint stored under pack {serial!r} belongs to "
                                  f"{str(stored.get('serial', ''))!r}")
        state = cls.new(serial)
        try:
            state._load(stored)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint of pack {serial!r} is inconsistent: {exc}") from exc
        return state

    def _load(self, stored: dict[str, npt.NDArray[Any]]) -> None:
        # Copies, so every array is writeable, owned and C-contiguous: the kernels update them in
        # place, and numba would compile a separate signature for read-only arrays.
        def floats(name: str, default: FloatArray) -> FloatArray:
            return np.array(stored.get(name, default), dtype=np.float64, copy=True)

        def ints(name: str, default: IntArray) -> IntArray:
            return np.array(stored.get(name, default), dtype=np.int64, copy=True)

        def scalar(name: str, default: float) -> float:
            return float(stored.get(name, default))

        self.first_ts = scalar("first_ts", self.first_ts)
        self.last_ts = scalar("last_ts", self.last_ts)
        self.last_current_a = scalar("last_current_a", self.last_current_a)
        self.last_pack_voltage_v = scalar("last_pack_voltage_v", self.last_pack_voltage_v)
        self.bus_rated_capacity_ah = scalar("bus_rated_capacity_ah", self.bus_rated_capacity_ah)
        self.telemetry_tick_ts = scalar("telemetry_tick_ts", self.telemetry_tick_ts)
        self.health_tick_ts = scalar("health_tick_ts", self.health_tick_ts)
        self.r0_steps = int(stored.get("r0_steps", self.r0_steps))
        self.last_cell_voltages_v = floats("last_cell_voltages_v", self.last_cell_voltages_v)
        self.last_cell_valid = np.array(stored.get("last_cell_valid", self.last_cell_valid),
                                        dtype=np.bool_, copy=True)
        self.totals = floats("totals", self.totals)
        self.r0_ring = floats("r0_ring", self.r0_ring)
        self.r0_cell_steps = ints("r0_cell_steps", self.r0_cell_steps)
        for prefix, debouncer in self._debouncers():
            debouncer.reported = ints(f"{prefix}.reported", debouncer.reported)
            debouncer.candidate = ints(f"{prefix}.candidate", debouncer.candidate)
            debouncer.since = floats(f"{prefix}.since", debouncer.since)
        self._check()

    def _check(self) -> None:
        cells = self.cell_count
        shapes = {
            "last_cell_voltages_v": (self.last_cell_voltages_v.shape, (cells,)),
            "last_cell_valid": (self.last_cell_valid.shape, (cells,)),
            "totals": (self.totals.shape, (THROUGHPUT_COLUMNS,)),
            "r0_ring": (self.r0_ring.shape, (cells, R0_WINDOW)),
            "r0_cell_steps": (self.r0_cell_steps.shape, (cells,)),
        }
        channels = {_FAULTS: 1, _CELL_VALIDITY: cells, _TEMP_VALIDITY: self.sensor_count}
        for prefix, debouncer in self._debouncers():
            for part in ("reported", "candidate", "since"):
                shapes[f"{prefix}.{part}"] = (getattr(debouncer, part).shape, (channels[prefix],))
        for name, (actual, expected) in shapes.items():
            if actual != expected:
                raise ValueError(f"{name} has shape {actual}, expected {expected}")
        if not (np.all(np.isfinite(self.totals)) and np.all(self.totals >= 0.0)):
            raise ValueError(f"throughput totals {self.totals.tolist()} are not finite and ≥ 0")

    def _debouncers(self) -> tuple[tuple[str, DebounceState], ...]:
        return ((_FAULTS, self.faults), (_CELL_VALIDITY, self.cell_validity),
                (_TEMP_VALIDITY, self.temp_validity))
