"""Per-pack estimator state of the edge core, and its checkpoint format.

The state is everything the edge core needs to continue a pack exactly where it left off: the last
accepted sample (integration and the estimators span batch boundaries), the lifetime counters, the
estimators' state, the reporting-interval grid and the event debouncers.

It is checkpointed into the store in the same transaction as the records it produced, in up to
three keys, so that what changes with every sample is small and what is large is written only when
it changes:

- ``edge/<serial>``: the *running* state — last sample, counters, current offset and rest, SOC,
  the step detector's window, the RLS model, debouncers. Written with every commit that carries
  records of the pack, i.e. at most once per telemetry interval. For a 192-cell pack about
  19 kB (32 kB before deflating).
- ``edge.r0/<serial>``: the resistance history — every cell's latest accepted step estimates with
  their temperatures, the temperature × SOC bins of the Arrhenius fit, the baseline and the trend.
  Written only when a step was accepted (for 192 cells at most about 30 kB).
- ``edge.capacity/<serial>``: the capacity estimators — AWTLS sums per cell and for the pack, the
  last OCV point, self-discharge sums and the trend. Written only when an OCV point was taken
  (for 192 cells at most about 23 kB).

Format: a deflated ``.npz`` archive (``np.savez_compressed``) per key, of named arrays with
``version`` and ``serial``. Much of the state is NaN or zero until the estimators have seen a
rest or a step, and deflating halves the running state (a millisecond per write, at most once a
second). Scalars of the running state are grouped into a few vectors (names in
:mod:`gateway.edge.kernels`), since every archive entry costs about 250 bytes of zip headers.
Floats are stored bit-exact, so a restored pack continues with exactly the same figures as an
uninterrupted run. To add a field in a later version: give it a default in :meth:`PackState.new`,
add it to the archive, and leave the loader to keep the default when an older checkpoint lacks the
key. Version 1 checkpoints (one key, the R0 ring in float64 without temperatures) load into
version 2. A checkpoint from a newer version, or one that does not decode, is refused
(:class:`CheckpointError`) rather than replaced by a fresh state: lifetime counters must never go
backwards.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.edge import kernels as kn
from gateway.edge.kernels import THROUGHPUT_COLUMNS, IntArray
from gateway.errors import GatewayError
from gateway.model import BoolArray, FloatArray

STATE_VERSION = 2

Float32Array = npt.NDArray[np.float32]

#: How many of the latest accepted current steps each cell's R0 median is taken over. It is the
#: ring's width in the checkpoint: changing it needs a new ``STATE_VERSION`` that converts rings
#: (version 1 kept 16).
R0_WINDOW = 24

#: Temperature × SOC bins of the pack's step results, for the Arrhenius fit: edges in °C and in
#: SOC; each bin keeps its latest ``BIN_WINDOW`` results.
TEMP_BIN_EDGES_C = (5.0, 15.0, 25.0, 35.0, 45.0)
SOC_BIN_EDGES = (0.2, 0.4, 0.6, 0.8)
TEMP_BINS = len(TEMP_BIN_EDGES_C) + 1
SOC_BINS = len(SOC_BIN_EDGES) + 1
BIN_WINDOW = 8

#: Linear-trend sums (Σw, Σwx, Σwy, Σwx², Σwxy, Σwy²) of a figure against full cycles.
TREND_SLOTS = 6

#: The value a debounced channel is assumed to have before the first sample: no fault flags set,
#: every cell and sensor valid (so a cell that is invalid from the start is reported once, like
#: one that fails later), no limit crossed.
FAULTS_INITIAL, VALID_INITIAL, LIMIT_INITIAL = 0, 1, 0

#: Limit channels (debounced): a cell below the deep-discharge voltage, above the overcharge
#: voltage, the hottest sensor at or above the high limit, the coldest at or below the low one.
LIMIT_DEEP_DISCHARGE, LIMIT_OVERCHARGE, LIMIT_HOT, LIMIT_COLD = range(4)
LIMIT_CHANNELS = 4

#: Keys of a pack's checkpoints; the serial follows the prefix.
RUNNING_PREFIX = "edge/"
RESISTANCE_PREFIX = "edge.r0/"
CAPACITY_PREFIX = "edge.capacity/"
PREFIXES = (RUNNING_PREFIX, RESISTANCE_PREFIX, CAPACITY_PREFIX)

#: Debouncer prefixes in the archive.
_FAULTS, _CELL_VALIDITY, _TEMP_VALIDITY, _LIMITS = ("faults", "cell_validity", "temp_validity",
                                                   "limits")


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


def fresh_pack_vector() -> FloatArray:
    """The estimators' pack-level scalars before the first sample."""
    pack = np.zeros(kn.PACK_SLOTS)
    pack[[kn.P_REST_SINCE, kn.P_ANCHOR_TS, kn.P_LAST_I_CORR]] = np.nan
    pack[kn.P_RLS_P + 0] = pack[kn.P_RLS_P + 4] = kn.RLS_P0_R
    pack[kn.P_RLS_P + 8] = kn.RLS_P0_KAPPA
    return pack


def fresh_cell_matrix(cells: int) -> FloatArray:
    """The estimators' per-cell values before the first sample."""
    out = np.zeros((cells, kn.CELL_SLOTS))
    out[:, [kn.CH_STUCK_REF, kn.CH_SOC, kn.CH_VREST, kn.CH_STEP_VPRE, kn.CH_RLS_E2,
            kn.CH_RLS_LAST_V, kn.CH_STEP_TEMP]] = np.nan
    return out


@dataclass(slots=True, eq=False)
class PackState:
    """Everything the edge core keeps for one pack. Owned by the pipeline thread alone.

    Not frozen: the kernels update the arrays in place, batch after batch. Times are POSIX
    seconds; NaN means "not yet seen". Per-cell arrays have one entry (row) per cell of the pack's
    current layout (zero when the BMS sends no per-cell voltages). Capacity arrays have one more
    row, the last, for the pack as a whole.
    """

    serial: str
    # --- running state (``edge/<serial>``) ---------------------------------------------------
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
    #: lifetime time counters, event counts and histograms, as ``kernels.C_*``
    counters: FloatArray
    #: the rated capacity the BMS last sent (used when the configuration sets none)
    bus_rated_capacity_ah: float
    #: the chemistry the BMS last sent
    bus_chemistry: str
    #: lifetime count of current steps that gave at least one cell an R0 estimate
    r0_steps: int
    #: measurement time of the sample that produced the last telemetry / health record (the
    #: interval grid continues from it; the health grid starts at ``first_ts``)
    telemetry_tick_ts: float
    health_tick_ts: float
    #: estimator scalars (``kernels.P_*``) and per-cell values (``kernels.CH_*``)
    pack: FloatArray
    cells: FloatArray
    #: per cell, the flag reasons last reported (bit mask of ``FLAG_*`` in the edge core)
    flags: IntArray
    faults: DebounceState
    cell_validity: DebounceState
    temp_validity: DebounceState
    limits: DebounceState
    # --- resistance history (``edge.r0/<serial>``) ---------------------------------------------
    #: per cell, the latest ``R0_WINDOW`` accepted step estimates (Ω, as measured) and the cell
    #: temperature at each (°C, NaN: unknown); how many each cell ever had
    r0_ring: Float32Array
    r0_ring_temp_c: Float32Array
    r0_cell_steps: IntArray
    #: temperature × SOC bins (row = temperature bin × SOC_BINS + SOC bin) of ln(pack median R0)
    #: and 1/T, each the latest ``BIN_WINDOW``; results held per bin (ever)
    r0_bin_ln: FloatArray
    r0_bin_inv_t: FloatArray
    r0_bin_held: IntArray
    #: per cell and for the pack (last entry), the R0 at 25 °C of the first full cycles (NaN: not
    #: yet established)
    r0_baseline: FloatArray
    #: trend of the resistance increase (%) against full cycles
    r0_trend: FloatArray
    # --- capacity (``edge.capacity/<serial>``) -------------------------------------------------
    #: AWTLS sums per cell and for the pack (last row), ``kernels.AWTLS_SLOTS`` columns
    awtls: FloatArray
    #: latest capacity estimates (Ah) and their variances, per cell and for the pack; updates
    capacity_ah: FloatArray
    capacity_var: FloatArray
    capacity_updates: IntArray
    #: the cells' SOC and its σ at the last OCV point (NaN: none yet)
    anchor_soc: FloatArray
    anchor_sigma: FloatArray
    #: self-discharge: per cell, Σ of charge lost beyond the pack median (Ah) over ``leak_hours``
    leak_ah: FloatArray
    leak_hours: float
    #: trend of the state of health (%) against full cycles
    capacity_trend: FloatArray
    # --- not checkpointed ------------------------------------------------------------------------
    #: the history keys changed since they were last taken
    resistance_dirty: bool = False
    capacity_dirty: bool = False

    @classmethod
    def new(cls, serial: str) -> PackState:
        state = cls(
            serial=serial, first_ts=np.nan, last_ts=np.nan, last_current_a=np.nan,
            last_pack_voltage_v=np.nan, last_cell_voltages_v=np.empty(0),
            last_cell_valid=np.empty(0, np.bool_), totals=np.zeros(THROUGHPUT_COLUMNS),
            counters=np.zeros(kn.COUNTER_SLOTS), bus_rated_capacity_ah=np.nan,
            bus_chemistry="", r0_steps=0, telemetry_tick_ts=-np.inf, health_tick_ts=np.nan,
            pack=fresh_pack_vector(), cells=fresh_cell_matrix(0),
            flags=np.zeros(0, np.int64),
            faults=DebounceState.fresh(1, FAULTS_INITIAL),
            cell_validity=DebounceState.fresh(0, VALID_INITIAL),
            temp_validity=DebounceState.fresh(0, VALID_INITIAL),
            limits=DebounceState.fresh(LIMIT_CHANNELS, LIMIT_INITIAL),
            r0_ring=np.zeros((0, R0_WINDOW), np.float32),
            r0_ring_temp_c=np.zeros((0, R0_WINDOW), np.float32),
            r0_cell_steps=np.zeros(0, np.int64),
            r0_bin_ln=np.zeros((TEMP_BINS * SOC_BINS, BIN_WINDOW)),
            r0_bin_inv_t=np.zeros((TEMP_BINS * SOC_BINS, BIN_WINDOW)),
            r0_bin_held=np.zeros(TEMP_BINS * SOC_BINS, np.int64),
            r0_baseline=np.full(1, np.nan), r0_trend=np.zeros(TREND_SLOTS),
            awtls=np.zeros((1, kn.AWTLS_SLOTS)), capacity_ah=np.full(1, np.nan),
            capacity_var=np.full(1, np.nan), capacity_updates=np.zeros(1, np.int64),
            anchor_soc=np.empty(0), anchor_sigma=np.empty(0), leak_ah=np.empty(0),
            leak_hours=0.0, capacity_trend=np.zeros(TREND_SLOTS),
        )
        return state

    @property
    def cell_count(self) -> int:
        return int(self.last_cell_voltages_v.shape[0])

    @property
    def sensor_count(self) -> int:
        return self.temp_validity.channels

    def reset_cells(self, cells: int) -> None:
        """Start the per-cell state over for a new cell layout (index i is no longer the same cell).

        Pack-level history (step count, counters, the Arrhenius bins, trends) stays: it counts
        the pack's history, not the layout's. Per-cell estimates, the capacity estimators and the
        baseline start again, and the step detector and SOC wait for fresh samples.
        """
        self.last_cell_voltages_v = np.full(cells, np.nan)
        self.last_cell_valid = np.zeros(cells, np.bool_)
        self.cells = fresh_cell_matrix(cells)
        self.flags = np.zeros(cells, np.int64)
        self.cell_validity = DebounceState.fresh(cells, VALID_INITIAL)
        self.r0_ring = np.zeros((cells, R0_WINDOW), np.float32)
        self.r0_ring_temp_c = np.zeros((cells, R0_WINDOW), np.float32)
        self.r0_cell_steps = np.zeros(cells, np.int64)
        self.r0_baseline = np.full(cells + 1, np.nan)
        self.awtls = np.zeros((cells + 1, kn.AWTLS_SLOTS))
        self.capacity_ah = np.full(cells + 1, np.nan)
        self.capacity_var = np.full(cells + 1, np.nan)
        self.capacity_updates = np.zeros(cells + 1, np.int64)
        self.anchor_soc = np.full(cells, np.nan)
        self.anchor_sigma = np.full(cells, np.nan)
        self.leak_ah = np.zeros(cells)
        self.leak_hours = 0.0
        step_slots = [kn.P_STEP_PHASE, kn.P_STEP_S1, kn.P_STEP_ST, kn.P_STEP_STT, kn.P_STEP_SI,
                      kn.P_STEP_N]
        self.pack[step_slots] = 0.0
        self.pack[[kn.P_ANCHOR_OK, kn.P_RELAXED]] = 0.0
        self.pack[kn.P_ANCHOR_TS] = np.nan
        self.resistance_dirty = self.capacity_dirty = True

    def reset_sensors(self, sensors: int) -> None:
        self.temp_validity = DebounceState.fresh(sensors, VALID_INITIAL)

    # -----------------------------------------------------------------------------------------
    # Checkpoints

    def to_bytes(self) -> bytes:
        """The running state (``edge/<serial>``)."""
        arrays: dict[str, npt.ArrayLike] = {
            "times": np.array([self.first_ts, self.last_ts, self.last_current_a,
                               self.last_pack_voltage_v, self.bus_rated_capacity_ah,
                               self.telemetry_tick_ts, self.health_tick_ts]),
            "r0_steps": np.int64(self.r0_steps),
            "bus_chemistry": np.str_(self.bus_chemistry),
            "last_cell_voltages_v": self.last_cell_voltages_v,
            "last_cell_valid": self.last_cell_valid,
            "totals": self.totals,
            "counters": self.counters,
            "pack": self.pack,
            "cells": self.cells,
            "flags": self.flags.astype(np.int8),  # three flag bits
        }
        for prefix, debouncer in self._debouncers():
            # Validity and limit channels are 0 or 1: a byte each instead of eight.
            small = prefix != _FAULTS
            arrays[f"{prefix}.reported"] = (debouncer.reported.astype(np.int8) if small
                                            else debouncer.reported)
            arrays[f"{prefix}.candidate"] = (debouncer.candidate.astype(np.int8) if small
                                             else debouncer.candidate)
            arrays[f"{prefix}.since"] = debouncer.since
        return self._archive(arrays)

    def resistance_bytes(self) -> bytes:
        """The resistance history (``edge.r0/<serial>``)."""
        return self._archive({
            "r0_ring": self.r0_ring, "r0_ring_temp_c": self.r0_ring_temp_c,
            "r0_cell_steps": self.r0_cell_steps, "r0_bin_ln": self.r0_bin_ln,
            "r0_bin_inv_t": self.r0_bin_inv_t, "r0_bin_held": self.r0_bin_held,
            "r0_baseline": self.r0_baseline, "r0_trend": self.r0_trend})

    def capacity_bytes(self) -> bytes:
        """The capacity estimators (``edge.capacity/<serial>``)."""
        return self._archive({
            "awtls": self.awtls, "capacity_ah": self.capacity_ah,
            "capacity_var": self.capacity_var, "capacity_updates": self.capacity_updates,
            "anchor_soc": self.anchor_soc, "anchor_sigma": self.anchor_sigma,
            "leak_ah": self.leak_ah, "leak_hours": np.float64(self.leak_hours),
            "capacity_trend": self.capacity_trend})

    def _archive(self, arrays: dict[str, npt.ArrayLike]) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, allow_pickle=False, version=np.int64(STATE_VERSION),
                            serial=np.str_(self.serial), **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, serial: str, *, resistance: bytes | None = None,
                   capacity: bytes | None = None) -> PackState:
        """Decode the checkpoints of ``serial``; raises :class:`CheckpointError`."""
        stored: dict[str, npt.NDArray[Any]] = {}
        for part, data in (("running", blob), ("resistance", resistance),
                           ("capacity", capacity)):
            if data is not None:
                stored.update(_unpack(data, serial, part))
        state = cls.new(serial)
        try:
            state._load(stored)
        except (TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"checkpoint of pack {serial!r} is inconsistent: {exc}") from exc
        return state

    def _load(self, stored: dict[str, npt.NDArray[Any]]) -> None:
        # Copies, so every array is writeable, owned and C-contiguous: the kernels update them in
        # place, and numba would compile a separate signature for read-only arrays.
        def array(name: str, default: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return np.array(stored.get(name, default), dtype=default.dtype, copy=True)

        if "times" in stored:  # version 2
            times = np.array(stored["times"], dtype=np.float64)
            (self.first_ts, self.last_ts, self.last_current_a, self.last_pack_voltage_v,
             self.bus_rated_capacity_ah, self.telemetry_tick_ts,
             self.health_tick_ts) = (float(x) for x in times)
        else:  # version 1: each scalar in its own entry
            for name in ("first_ts", "last_ts", "last_current_a", "last_pack_voltage_v",
                         "bus_rated_capacity_ah", "telemetry_tick_ts", "health_tick_ts"):
                setattr(self, name, float(stored.get(name, getattr(self, name))))
        self.r0_steps = int(stored.get("r0_steps", self.r0_steps))
        self.bus_chemistry = str(stored.get("bus_chemistry", self.bus_chemistry))
        self.last_cell_voltages_v = array("last_cell_voltages_v", self.last_cell_voltages_v)
        cells = self.cell_count
        # Per-cell defaults follow the stored layout; stored arrays must then agree with it.
        self.reset_cells(cells)
        self.resistance_dirty = self.capacity_dirty = False
        self.last_cell_voltages_v = array("last_cell_voltages_v", self.last_cell_voltages_v)
        self.last_cell_valid = array("last_cell_valid", self.last_cell_valid)
        self.totals = array("totals", self.totals)
        self.counters = array("counters", self.counters)
        self.pack = array("pack", self.pack)
        if "pack" not in stored:  # version 1: no offset was subtracted from the last current
            self.pack[kn.P_LAST_I_CORR] = self.last_current_a
        self.cells = array("cells", self.cells)
        self.flags = array("flags", self.flags)
        for prefix, debouncer in self._debouncers():
            default = DebounceState.fresh(
                {_FAULTS: 1, _CELL_VALIDITY: cells, _LIMITS: LIMIT_CHANNELS}.get(
                    prefix, int(np.asarray(stored.get(f"{prefix}.reported", [])).shape[0])),
                {_FAULTS: FAULTS_INITIAL, _LIMITS: LIMIT_INITIAL}.get(prefix, VALID_INITIAL))
            debouncer.reported = array(f"{prefix}.reported", default.reported)
            debouncer.candidate = array(f"{prefix}.candidate", default.candidate)
            debouncer.since = array(f"{prefix}.since", default.since)
        self.r0_cell_steps = array("r0_cell_steps", self.r0_cell_steps)
        if "r0_ring" in stored and stored["r0_ring"].dtype == np.float64:
            self._load_version_1_ring(np.asarray(stored["r0_ring"]))
        else:
            self.r0_ring = array("r0_ring", self.r0_ring)
            self.r0_ring_temp_c = array("r0_ring_temp_c", self.r0_ring_temp_c)
        for name in ("r0_bin_ln", "r0_bin_inv_t", "r0_bin_held", "r0_baseline", "r0_trend",
                     "awtls", "capacity_ah", "capacity_var", "capacity_updates", "anchor_soc",
                     "anchor_sigma", "leak_ah", "capacity_trend"):
            setattr(self, name, array(name, getattr(self, name)))
        self.leak_hours = float(stored.get("leak_hours", self.leak_hours))
        self._check()

    def _load_version_1_ring(self, old: npt.NDArray[Any]) -> None:
        """Version 1 kept 16 estimates per cell in float64, without temperatures.

        They are carried over in the order they were taken (oldest first, so the next estimate
        replaces the oldest), taken as measured at 25 °C; a cell's count becomes how many are
        held, so the ring continues from there.
        """
        cells, window = old.shape
        if window > R0_WINDOW or self.r0_cell_steps.shape != (cells,):
            raise ValueError(f"version 1 R0 ring has shape {old.shape}")
        held = np.minimum(self.r0_cell_steps, window)
        oldest = np.where(self.r0_cell_steps > window, self.r0_cell_steps % window, 0)
        self.r0_ring = np.zeros((cells, R0_WINDOW), np.float32)
        self.r0_ring_temp_c = np.full((cells, R0_WINDOW), np.nan, np.float32)
        for j in range(cells):
            ordered = np.roll(old[j], -int(oldest[j]))[:held[j]]
            self.r0_ring[j, :held[j]] = ordered
        self.r0_cell_steps = held.astype(np.int64)

    def _check(self) -> None:
        cells = self.cell_count
        bins = TEMP_BINS * SOC_BINS
        shapes = {
            "last_cell_voltages_v": (self.last_cell_voltages_v.shape, (cells,)),
            "last_cell_valid": (self.last_cell_valid.shape, (cells,)),
            "totals": (self.totals.shape, (THROUGHPUT_COLUMNS,)),
            "counters": (self.counters.shape, (kn.COUNTER_SLOTS,)),
            "pack": (self.pack.shape, (kn.PACK_SLOTS,)),
            "cells": (self.cells.shape, (cells, kn.CELL_SLOTS)),
            "flags": (self.flags.shape, (cells,)),
            "r0_ring": (self.r0_ring.shape, (cells, R0_WINDOW)),
            "r0_ring_temp_c": (self.r0_ring_temp_c.shape, (cells, R0_WINDOW)),
            "r0_cell_steps": (self.r0_cell_steps.shape, (cells,)),
            "r0_bin_ln": (self.r0_bin_ln.shape, (bins, BIN_WINDOW)),
            "r0_bin_inv_t": (self.r0_bin_inv_t.shape, (bins, BIN_WINDOW)),
            "r0_bin_held": (self.r0_bin_held.shape, (bins,)),
            "r0_baseline": (self.r0_baseline.shape, (cells + 1,)),
            "r0_trend": (self.r0_trend.shape, (TREND_SLOTS,)),
            "awtls": (self.awtls.shape, (cells + 1, kn.AWTLS_SLOTS)),
            "capacity_ah": (self.capacity_ah.shape, (cells + 1,)),
            "capacity_var": (self.capacity_var.shape, (cells + 1,)),
            "capacity_updates": (self.capacity_updates.shape, (cells + 1,)),
            "anchor_soc": (self.anchor_soc.shape, (cells,)),
            "anchor_sigma": (self.anchor_sigma.shape, (cells,)),
            "leak_ah": (self.leak_ah.shape, (cells,)),
            "capacity_trend": (self.capacity_trend.shape, (TREND_SLOTS,)),
        }
        channels = {_FAULTS: 1, _CELL_VALIDITY: cells, _TEMP_VALIDITY: self.sensor_count,
                    _LIMITS: LIMIT_CHANNELS}
        for prefix, debouncer in self._debouncers():
            for part in ("reported", "candidate", "since"):
                shapes[f"{prefix}.{part}"] = (getattr(debouncer, part).shape, (channels[prefix],))
        for name, (actual, expected) in shapes.items():
            if actual != expected:
                raise ValueError(f"{name} has shape {actual}, expected {expected}")
        for name, counter in (("throughput totals", self.totals), ("counters", self.counters)):
            if not (np.all(np.isfinite(counter)) and np.all(counter >= 0.0)):
                raise ValueError(f"{name} {counter.tolist()} are not finite and ≥ 0")

    def _debouncers(self) -> tuple[tuple[str, DebounceState], ...]:
        return ((_FAULTS, self.faults), (_CELL_VALIDITY, self.cell_validity),
                (_TEMP_VALIDITY, self.temp_validity), (_LIMITS, self.limits))


def _unpack(blob: bytes, serial: str, part: str) -> dict[str, npt.NDArray[Any]]:
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as archive:
            stored = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{part} checkpoint of pack {serial!r} does not decode: "
                              f"{exc}") from exc
    version = int(stored.pop("version", -1))
    if not 1 <= version <= STATE_VERSION:
        raise CheckpointError(f"{part} checkpoint of pack {serial!r} has version {version}; this "
                              f"gateway reads versions 1 to {STATE_VERSION}")
    owner = str(stored.pop("serial", ""))
    if owner != serial:
        raise CheckpointError(f"{part} checkpoint stored under pack {serial!r} belongs to "
                              f"{owner!r}")
    return stored
