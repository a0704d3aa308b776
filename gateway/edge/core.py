"""The edge core: per-pack samples in, telemetry / health / events records out.

One pipeline thread owns an :class:`EdgeCore`. Each call to :meth:`EdgeCore.process` groups the
batch by pack, stacks each pack's samples into matrices (rows are samples, columns are cells) and
runs every kernel once over them; Python touches each sample only to copy it into the matrices.
Row 0 of every matrix is the pack's previous sample from its state, so integration, step
detection and every estimator run across batch boundaries, and a batch split anywhere gives the
same result.

Per run of samples: plausibility masks (range, a reading that jumps alone, a stuck reading), the
current's zero offset calibrated at rest and subtracted, voltages aligned to the current's
instants, lifetime throughput, then the estimators (:mod:`gateway.edge.estimators`: SOC, R0 from
current steps and by recursive least squares, capacity by AWTLS, flags, passport counters,
trends), cut at each health row so every health record reports the state as of its own sample.

Record bodies are documented field by field in docs/records.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from gateway.config import EdgeSection
from gateway.edge import kernels
from gateway.edge.estimators import (
    EVENT_HOLD_S,
    MAX_GAP_S,
    MAX_STEP_DT_S,
    Estimators,
    RunInputs,
    iso_time,
)
from gateway.edge.kernels import (
    AH_CHARGE,
    AH_DISCHARGE,
    AH_TOTAL,
    EVENT_CHANNEL,
    EVENT_NEW,
    EVENT_OLD,
    EVENT_ROW,
    STAT_MAX,
    STAT_MEAN,
    STAT_MIN,
    STAT_SPREAD,
    WH_CHARGE,
    WH_DISCHARGE,
    WH_TOTAL,
    IntArray,
)
from gateway.edge.state import (
    CAPACITY_PREFIX,
    PREFIXES,
    RESISTANCE_PREFIX,
    RUNNING_PREFIX,
    CheckpointError,
    DebounceState,
    PackState,
)
from gateway.metrics import Metrics
from gateway.model import BoolArray, FloatArray, Record, RecordKind, Sample

__all__ = ["CHECKPOINT_PREFIX", "EVENT_HOLD_S", "MAX_GAP_S", "MAX_STEP_DT_S", "EdgeCore",
           "iso_time"]

#: The running state of a pack is under ``edge/<serial>``; its histories under ``edge.r0/`` and
#: ``edge.capacity/`` (see gateway/edge/state.py). Other keys in the store belong to someone else.
CHECKPOINT_PREFIX = RUNNING_PREFIX

#: A cell reading that moves alone by more than this (V) between two samples, or stays exactly
#: the same while the pack's mean cell voltage moves by more than ``STUCK_DV_V``, is masked.
JUMP_V = 0.15
STUCK_DV_V = 0.02

#: Rounding of per-cell values in telemetry: 0.1 mV and 0.01 °C, finer than any BMS resolves.
VOLTAGE_DECIMALS = 4
TEMP_DECIMALS = 2

#: Turns one debounced change (channel, old value, new value) into an event item.
_Describe = Callable[[int, int, int], dict[str, Any]]
_NO_LAYOUT = -1  # a per-cell vector the sample does not carry

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Run:
    """Consecutive accepted samples of one pack with the same cell and sensor counts."""

    samples: list[Sample]
    cells: int
    sensors: int


@dataclass(frozen=True, slots=True)
class _Matrices:
    """A run of m samples stacked for the kernels.

    Row 0 of the (m + 1)-row arrays is the pack's previous sample, so integration and step
    detection continue across batches; temperatures need no continuity and have m rows.
    """

    t: FloatArray
    current_a: FloatArray
    pack_voltage_v: FloatArray
    cell_voltages_v: FloatArray
    cell_mask: BoolArray
    temps_c: FloatArray
    temp_mask: BoolArray


class EdgeCore:
    """Per-pack estimators over sample batches; see the module docstring and docs/records.md.

    Not thread-safe: one pipeline thread calls every method. The kernels release the GIL, so
    the I/O threads run while a batch is being computed.
    """

    def __init__(self, settings: EdgeSection, metrics: Metrics) -> None:
        self._metrics = metrics
        self._settings = settings
        # Floats here once, so every kernel call has the same numba signature as warm_up's.
        self._telemetry_interval_s = float(settings.telemetry_interval_s)
        self._health_interval_s = float(settings.health_interval_s)
        self._rated_capacity_ah = float(settings.rated_capacity_ah)
        self._voltage_range = (float(settings.cell_voltage_min_v),
                               float(settings.cell_voltage_max_v))
        self._temp_range = (float(settings.cell_temp_min_c), float(settings.cell_temp_max_c))
        self._estimators = Estimators(settings)
        self._packs: dict[str, PackState] = {}
        self._changed: set[str] = set()
        #: a scratch core (warm_up's) keeps its synthetic packs out of the log
        self._announce = True

    def warm_up(self) -> None:
        """Compile, or load from numba's cache, every kernel signature :meth:`process` uses.

        The supervisor calls this before it reports READY, so the first batch does not stall the
        pipeline for seconds of compilation. A scratch core runs a few synthetic minutes of a
        two-cell pack through every estimator: rests long enough for OCV points, current steps,
        a discharge between them, temperatures, and a pack that sends only min/max values.
        """
        settings = EdgeSection(telemetry_interval_s=1.0, health_interval_s=30.0,
                               rated_capacity_ah=10.0, chemistry="NMC", ocv_rest_s=20.0,
                               rest_settle_s=1.0, capacity_min_delta_soc=0.01,
                               baseline_efc=0.0)
        scratch = EdgeCore(settings, Metrics())
        scratch._announce = False
        samples: list[Sample] = []
        soc = 0.9
        for k in range(1500):
            ts = 1_000_000.0 + 0.5 * k
            phase = k % 300
            current = 0.0 if phase < 100 else (10.0 if phase % 20 < 10 else 4.0)
            soc -= current * 0.5 / 3600.0 / 10.0
            volts = 3.3 + 0.9 * soc - current * np.array([0.010, 0.012])
            samples.append(Sample(
                serial="warm-up", ts=ts, current_a=current, pack_voltage_v=float(volts.sum()),
                bms_soc_pct=100.0 * soc, state="drive", fault_flags=0, cell_voltages_v=volts,
                cell_voltage_valid=np.ones(2, np.bool_), cell_temps_c=np.array([25.0]),
                cell_temp_valid=np.ones(1, np.bool_)))
        samples.append(Sample(serial="warm-up-minmax", ts=1_000_000.0, current_a=1.0,
                              pack_voltage_v=7.0, bms_soc_pct=50.0, state="drive",
                              fault_flags=0, cell_voltages_v=None, cell_voltage_valid=None,
                              cell_temps_c=None, cell_temp_valid=None))
        scratch.process(samples)
        scratch.take_checkpoints()
        state = scratch._packs["warm-up"]
        # Estimators a short synthetic run may not reach: AWTLS and the Arrhenius fit.
        kernels.awtls_update(np.zeros((3, kernels.AWTLS_SLOTS)), np.ones(3), np.full(3, 10.0),
                             np.full(3, 1e-4), np.full(3, 1e-2), 0.98, np.ones(3, np.bool_))
        kernels.arrhenius_fit(state.r0_bin_ln, state.r0_bin_inv_t, state.r0_bin_held,
                              np.zeros(state.r0_bin_held.shape[0], np.int64), 1, 3, 8.0)
        kernels.ring_push(state.r0_ring, state.r0_ring_temp_c, state.r0_cell_steps,
                          np.full((1, 2), np.nan), np.full((1, 2), 25.0))

    def restore(self, checkpoints: Mapping[str, bytes]) -> None:
        """Continue the packs of a previous run from their checkpoints (see gateway/edge/state.py).

        Raises :class:`~gateway.edge.state.CheckpointError` for a checkpoint that cannot be read,
        or a history without the pack's running state: starting that pack from zero would send
        its lifetime counters backwards.
        """
        parts: dict[str, dict[str, bytes]] = {}
        for key, blob in checkpoints.items():
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    parts.setdefault(key[len(prefix):], {})[prefix] = blob
                    break
        for serial, found in parts.items():
            if RUNNING_PREFIX not in found:
                raise CheckpointError(f"pack {serial!r} has checkpointed history "
                                      f"({', '.join(sorted(found))}) but no running state")
            self._packs[serial] = PackState.from_bytes(
                found[RUNNING_PREFIX], serial, resistance=found.get(RESISTANCE_PREFIX),
                capacity=found.get(CAPACITY_PREFIX))
        _log.info("edge.restored", packs=len(parts))

    def take_checkpoints(self) -> dict[str, bytes]:
        """The state of every pack that produced records since the last call, by key.

        A pack's running state goes with the records it produced (the store commits both in one
        transaction); its histories only when they changed. Batches that produced no record are
        not checkpointed on their own: after a crash the pack continues from its last record,
        which is what anyone outside has seen, so no published counter goes backwards, and the
        few samples in between are bridged like any short gap. This keeps the SD card of a
        gateway from being rewritten with every batch.
        """
        out: dict[str, bytes] = {}
        for serial in sorted(self._changed):
            state = self._packs[serial]
            out[RUNNING_PREFIX + serial] = state.to_bytes()
            if state.resistance_dirty:
                out[RESISTANCE_PREFIX + serial] = state.resistance_bytes()
                state.resistance_dirty = False
            if state.capacity_dirty:
                out[CAPACITY_PREFIX + serial] = state.capacity_bytes()
                state.capacity_dirty = False
        self._changed.clear()
        return out

    def process(self, samples: Sequence[Sample]) -> list[Record]:
        """Records for a batch of samples (any packs, each pack's samples in time order)."""
        by_pack: dict[str, list[Sample]] = {}
        for sample in samples:
            group = by_pack.get(sample.serial)
            if group is None:
                by_pack[sample.serial] = [sample]
            else:
                group.append(sample)
        records: list[Record] = []
        for serial, group in by_pack.items():
            records.extend(self._process_pack(serial, group))
        records.sort(key=lambda r: r.ts)  # stable: a pack's own order holds at equal times
        return records

    # -----------------------------------------------------------------------------------------

    def _process_pack(self, serial: str, group: list[Sample]) -> list[Record]:
        state = self._packs.get(serial)
        if state is None:
            state = self._packs[serial] = PackState.new(serial)
            if self._announce:
                _log.info("edge.pack_seen", serial=serial)
        accepted, layouts = self._accept(state, group)
        if not accepted:
            return []
        records: list[Record] = []
        for run in self._runs(state, accepted, layouts):
            records.extend(self._process_run(state, run))
        if records:
            self._changed.add(serial)
        return records

    def _accept(self, state: PackState,
                group: list[Sample]) -> tuple[list[Sample], list[tuple[int, int]]]:
        """The samples to process, with their layouts; the others are counted by reason."""
        wellformed: list[Sample] = []
        layouts: list[tuple[int, int]] = []
        for sample in group:
            layout = _layout(sample)
            if layout is not None:
                wellformed.append(sample)
                layouts.append(layout)
        if len(wellformed) < len(group):
            self._metrics.inc("samples_rejected_total", len(group) - len(wellformed),
                              label="malformed")
        if not wellformed:
            return [], []
        ts = np.array([s.ts for s in wellformed])
        previous = state.last_ts if math.isfinite(state.last_ts) else -math.inf
        # A sample is in order when it is after every earlier one; a rejected sample is never
        # after the running maximum, so the maximum over all earlier samples is the accepted one.
        in_order = ts > np.maximum.accumulate(np.concatenate(([previous], ts[:-1])))
        late = len(wellformed) - int(np.count_nonzero(in_order))
        if late == 0:
            return wellformed, layouts
        self._metrics.inc("samples_rejected_total", late, label="time_order")
        keep = np.flatnonzero(in_order).tolist()
        return [wellformed[k] for k in keep], [layouts[k] for k in keep]

    @staticmethod
    def _runs(state: PackState, samples: list[Sample],
              layouts: list[tuple[int, int]]) -> list[_Run]:
        """Split samples where the cell or sensor count changes.

        A sample without per-cell values keeps the pack's known count (its cells are simply not
        valid in that sample), so a BMS that skips a cycle's vectors does not reset the estimators.
        """
        known_cells, known_sensors = state.cell_count, state.sensor_count
        runs: list[_Run] = []
        for sample, (cells, sensors) in zip(samples, layouts, strict=True):
            known_cells = known_cells if cells == _NO_LAYOUT else cells
            known_sensors = known_sensors if sensors == _NO_LAYOUT else sensors
            if runs and runs[-1].cells == known_cells and runs[-1].sensors == known_sensors:
                runs[-1].samples.append(sample)
            else:
                runs.append(_Run([sample], known_cells, known_sensors))
        return runs

    def _process_run(self, state: PackState, run: _Run) -> list[Record]:
        samples = run.samples
        layout_event = self._adopt_layout(state, run.cells, run.sensors)
        stacked = self._stack(state, run)
        for sample in reversed(samples):
            if math.isfinite(sample.rated_capacity_ah) and sample.rated_capacity_ah > 0.0:
                state.bus_rated_capacity_ah = float(sample.rated_capacity_ah)
                break
        for sample in reversed(samples):
            if sample.chemistry:
                state.bus_chemistry = sample.chemistry
                break
        rated_ah = (self._rated_capacity_ah if self._rated_capacity_ah > 0.0
                    else state.bus_rated_capacity_ah)

        # Conditioning: the current's zero offset, calibrated at rest; voltages aligned to it.
        corrected, rest_s = kernels.condition_current(
            stacked.t, stacked.current_a, float(self._settings.rest_current_c_rate) * rated_ah,
            float(self._settings.rest_settle_s), MAX_GAP_S, state.pack)
        cumulative = kernels.integrate_throughput(stacked.t, corrected, stacked.pack_voltage_v,
                                                  state.totals, MAX_GAP_S)
        state.totals = cumulative[-1].copy()
        aligned, aligned_mask = kernels.align_cells(stacked.t, stacked.cell_voltages_v,
                                                    stacked.cell_mask,
                                                    float(self._settings.current_lag_s))

        new_t = stacked.t[1:]
        if math.isnan(state.first_ts):
            state.first_ts = state.health_tick_ts = float(new_t[0])
        telemetry_ticks, state.telemetry_tick_ts = kernels.interval_ticks(
            new_t, 0.0, self._telemetry_interval_s, state.telemetry_tick_ts)
        health_ticks, state.health_tick_ts = kernels.interval_ticks(
            new_t, state.first_ts, self._health_interval_s, state.health_tick_ts)
        health_rows = np.flatnonzero(health_ticks).tolist()

        events: dict[int, list[dict[str, Any]]] = {}
        if layout_event is not None:
            events[0] = [layout_event]
        faults = np.array([[sample.fault_flags] for sample in samples], np.int64)
        self._debounced_events(events, new_t, faults, state.faults, _fault_event)
        self._debounced_events(events, new_t, stacked.cell_mask[1:].astype(np.int64),
                               state.cell_validity, _CELL_VOLTAGE_EVENT)
        self._debounced_events(events, new_t, stacked.temp_mask.astype(np.int64),
                               state.temp_validity, _CELL_TEMP_EVENT)

        figures, estimator_events = self._estimators.run(state, RunInputs(
            t=stacked.t, current_a=corrected, rest_s=rest_s,
            volts=np.vstack([stacked.cell_voltages_v[:1], aligned]),
            mask=np.vstack([stacked.cell_mask[:1], aligned_mask]),
            raw_volts=stacked.cell_voltages_v, raw_mask=stacked.cell_mask,
            temps=stacked.temps_c, temp_mask=stacked.temp_mask, rated_ah=rated_ah,
            chemistry=self._estimators.chemistry(state)), health_rows)
        for row, items in estimator_events.items():
            events.setdefault(row, []).extend(items)

        state.last_ts = float(stacked.t[-1])
        state.last_current_a = float(stacked.current_a[-1])
        state.last_pack_voltage_v = float(stacked.pack_voltage_v[-1])
        state.last_cell_voltages_v = stacked.cell_voltages_v[-1].copy()
        state.last_cell_valid = stacked.cell_mask[-1].copy()

        # (row, kind order, record): a row's telemetry, then its health, then its events.
        telemetry = self._telemetry_records(state.serial, samples, stacked, cumulative,
                                            telemetry_ticks)
        ordered = [(row, 0, record) for row, record in telemetry]
        for row, estimates in zip(health_rows, figures, strict=True):
            body = _health(samples[row], cumulative[row + 1], rated_ah)
            body.update(estimates)
            ordered.append((row, 1, Record(state.serial, RecordKind.HEALTH, samples[row].ts,
                                           body)))
        for row, items in events.items():
            ordered.append((row, 2, Record(state.serial, RecordKind.EVENTS, samples[row].ts,
                                           {"events": items})))
        ordered.sort(key=lambda entry: (entry[0], entry[1]))
        return [record for _, _, record in ordered]

    def _stack(self, state: PackState, run: _Run) -> _Matrices:
        """The run's samples as matrices, plausibility applied and counted."""
        samples, m = run.samples, len(run.samples)
        scalars = np.array([(x.ts, x.current_a, x.pack_voltage_v) for x in samples])
        volts = np.empty((m + 1, run.cells))
        volts[0] = state.last_cell_voltages_v
        flagged = _copy_vectors(samples, volts[1:], cells=True)
        mask, implausible = kernels.mask_plausible(volts[1:], flagged, *self._voltage_range)
        if implausible:
            self._metrics.inc("cell_values_masked_total", implausible, label="voltage_range")
        cell_mask = np.empty((m + 1, run.cells), np.bool_)
        cell_mask[0] = state.last_cell_valid
        cell_mask[1:] = mask
        stuck_ref = np.ascontiguousarray(state.cells[:, kernels.CH_STUCK_REF])
        cell_mask[1:], stuck, jumped = kernels.mask_jumps_and_stuck(volts, cell_mask, stuck_ref,
                                                                    STUCK_DV_V, JUMP_V)
        state.cells[:, kernels.CH_STUCK_REF] = stuck_ref
        if stuck:
            self._metrics.inc("cell_values_masked_total", stuck, label="voltage_stuck")
        if jumped:
            self._metrics.inc("cell_values_masked_total", jumped, label="voltage_jump")
        temps = np.empty((m, run.sensors))
        flagged = _copy_vectors(samples, temps, cells=False)
        temp_mask, implausible = kernels.mask_plausible(temps, flagged, *self._temp_range)
        if implausible:
            self._metrics.inc("cell_values_masked_total", implausible, label="temp_range")
        return _Matrices(
            t=np.concatenate(([state.last_ts], scalars[:, 0])),
            current_a=np.concatenate(([state.last_current_a], scalars[:, 1])),
            pack_voltage_v=np.concatenate(([state.last_pack_voltage_v], scalars[:, 2])),
            cell_voltages_v=volts, cell_mask=cell_mask, temps_c=temps, temp_mask=temp_mask)

    def _telemetry_records(self, serial: str, samples: list[Sample], stacked: _Matrices,
                           cumulative: FloatArray,
                           ticks: BoolArray) -> list[tuple[int, Record]]:
        rows = np.flatnonzero(ticks)
        if not rows.size:
            return []
        volt_stats, volt_counts = kernels.masked_stats(stacked.cell_voltages_v[rows + 1],
                                                       stacked.cell_mask[rows + 1])
        temp_stats, temp_counts = kernels.masked_stats(stacked.temps_c[rows],
                                                       stacked.temp_mask[rows])
        out: list[tuple[int, Record]] = []
        for k, row in enumerate(rows.tolist()):
            sample = samples[row]
            body = self._telemetry(sample, stacked.cell_voltages_v[row + 1],
                                   stacked.cell_mask[row + 1], volt_stats[k], int(volt_counts[k]),
                                   stacked.temps_c[row], stacked.temp_mask[row], temp_stats[k],
                                   int(temp_counts[k]), cumulative[row + 1])
            out.append((row, Record(serial, RecordKind.TELEMETRY, sample.ts, body)))
        return out

    @staticmethod
    def _adopt_layout(state: PackState, cells: int, sensors: int) -> dict[str, Any] | None:
        """Resize the per-cell state to the run's layout; an event when a known layout changed."""
        before = (state.cell_count, state.sensor_count)
        if cells != state.cell_count:
            state.reset_cells(cells)
        if sensors != state.sensor_count:
            state.reset_sensors(sensors)
        # The first vectors a pack sends set its layout; only a known layout can change.
        if not any(old > 0 and old != new for old, new in zip(before, (cells, sensors),
                                                               strict=True)):
            return None
        _log.warning("edge.pack_layout_changed", serial=state.serial, cells=cells,
                     previous_cells=before[0], sensors=sensors, previous_sensors=before[1])
        return {"type": "layout_changed", "cells": cells, "previous_cells": before[0],
                "sensors": sensors, "previous_sensors": before[1]}

    @staticmethod
    def _debounced_events(events: dict[int, list[dict[str, Any]]], t: FloatArray,
                          values: IntArray, debouncer: DebounceState,
                          describe: _Describe) -> None:
        changes, onsets = kernels.debounce(t, values, debouncer.reported, debouncer.candidate,
                                           debouncer.since, EVENT_HOLD_S)
        for change, onset in zip(changes.tolist(), onsets.tolist(), strict=True):
            item = describe(change[EVENT_CHANNEL], change[EVENT_OLD], change[EVENT_NEW])
            item["since"] = iso_time(onset)
            events.setdefault(change[EVENT_ROW], []).append(item)

    def _telemetry(self, sample: Sample, volts: FloatArray, volt_mask: BoolArray,
                   volt_stats: FloatArray, volt_count: int, temps: FloatArray,
                   temp_mask: BoolArray, temp_stats: FloatArray, temp_count: int,
                   totals: FloatArray) -> dict[str, Any]:
        body: dict[str, Any] = {}
        _put(body, "current_a", sample.current_a)
        _put(body, "pack_voltage_v", sample.pack_voltage_v)
        _put(body, "bms_soc_pct", sample.bms_soc_pct)
        if sample.state:
            body["state"] = sample.state
        body["fault_flags"] = int(sample.fault_flags)
        if sample.cell_voltages_v is not None:
            body["cell_voltages_v"] = _cell_list(volts, volt_mask, VOLTAGE_DECIMALS)
            if volt_count:
                _put(body, "cell_voltage_min_v", volt_stats[STAT_MIN], VOLTAGE_DECIMALS)
                _put(body, "cell_voltage_max_v", volt_stats[STAT_MAX], VOLTAGE_DECIMALS)
                _put(body, "cell_voltage_mean_v", volt_stats[STAT_MEAN], VOLTAGE_DECIMALS)
                _put(body, "cell_voltage_spread_v", volt_stats[STAT_SPREAD], VOLTAGE_DECIMALS)
        else:
            _bms_extremes(body, "cell_voltage", "v", sample.min_cell_voltage_v,
                          sample.max_cell_voltage_v, self._voltage_range, VOLTAGE_DECIMALS)
        if sample.cell_temps_c is not None:
            body["cell_temps_c"] = _cell_list(temps, temp_mask, TEMP_DECIMALS)
            if temp_count:
                _put(body, "cell_temp_min_c", temp_stats[STAT_MIN], TEMP_DECIMALS)
                _put(body, "cell_temp_max_c", temp_stats[STAT_MAX], TEMP_DECIMALS)
        else:
            _bms_extremes(body, "cell_temp", "c", sample.min_cell_temp_c, sample.max_cell_temp_c,
                          self._temp_range, TEMP_DECIMALS, spread=False)
        body["capacity_throughput_ah"] = float(totals[AH_TOTAL])
        body["capacity_throughput_charge_ah"] = float(totals[AH_CHARGE])
        body["capacity_throughput_discharge_ah"] = float(totals[AH_DISCHARGE])
        body["energy_throughput_wh"] = float(totals[WH_TOTAL])
        body["energy_throughput_charge_wh"] = float(totals[WH_CHARGE])
        body["energy_throughput_discharge_wh"] = float(totals[WH_DISCHARGE])
        return body


# ---------------------------------------------------------------------------------------------
# Helpers


def _layout(sample: Sample) -> tuple[int, int] | None:
    """(cells, sensors) a sample carries (``_NO_LAYOUT`` where absent); None if it is malformed.

    Malformed: a non-finite time, a vector that is not one-dimensional, or a validity mask whose
    length differs from its vector's.
    """
    if not math.isfinite(sample.ts):
        return None
    cells = _vector_length(sample.cell_voltages_v, sample.cell_voltage_valid)
    sensors = _vector_length(sample.cell_temps_c, sample.cell_temp_valid)
    if cells is None or sensors is None:
        return None
    return cells, sensors


def _vector_length(values: FloatArray | None, valid: BoolArray | None) -> int | None:
    if values is None:
        return _NO_LAYOUT
    if values.ndim != 1 or (valid is not None and valid.shape != values.shape):
        return None
    return int(values.shape[0])


def _copy_vectors(samples: list[Sample], out: FloatArray, *, cells: bool) -> BoolArray:
    """Copy the samples' cell voltages (``cells``) or temperatures into ``out``; their flags.

    A sample without the vector gets NaN values flagged invalid; a vector without a mask is
    taken as valid throughout (plausibility is still checked).
    """
    valid = np.ones(out.shape, np.bool_)
    if out.shape[1] == 0:
        return valid
    for i, sample in enumerate(samples):
        values, flags = ((sample.cell_voltages_v, sample.cell_voltage_valid) if cells
                         else (sample.cell_temps_c, sample.cell_temp_valid))
        if values is None:
            out[i] = np.nan
            valid[i] = False
        else:
            out[i] = values
            if flags is not None:
                valid[i] = flags
    return valid


def _put(body: dict[str, Any], key: str, value: float, decimals: int | None = None) -> None:
    """Set a figure only when it is known: JSON has no NaN, and nothing is invented."""
    value = float(value)
    if math.isfinite(value):
        body[key] = value if decimals is None else round(value, decimals)


def _cell_list(values: FloatArray, mask: BoolArray, decimals: int) -> list[float | None]:
    rounded: list[float | None] = np.round(values, decimals).tolist()
    for j in np.flatnonzero(~mask).tolist():
        rounded[j] = None
    return rounded


def _bms_extremes(body: dict[str, Any], name: str, unit: str, low: float, high: float,
                  plausible: tuple[float, float], decimals: int, *, spread: bool = True) -> None:
    """The BMS's own min/max, for a pack that sends no per-cell vector; implausible ones omitted."""
    lo, hi = plausible
    low_ok = lo <= low <= hi
    high_ok = lo <= high <= hi
    if low_ok:
        _put(body, f"{name}_min_{unit}", low, decimals)
    if high_ok:
        _put(body, f"{name}_max_{unit}", high, decimals)
    if spread and low_ok and high_ok:
        _put(body, f"{name}_spread_{unit}", high - low, decimals)


def _health(sample: Sample, totals: FloatArray, rated_ah: float) -> dict[str, Any]:
    """The health figures that come from the sample and the throughput counters."""
    body: dict[str, Any] = {"lastUpdate": iso_time(sample.ts)}
    body["capacityThroughput"] = float(totals[AH_TOTAL])
    body["capacityThroughputCharge"] = float(totals[AH_CHARGE])
    body["capacityThroughputDischarge"] = float(totals[AH_DISCHARGE])
    body["energyThroughput"] = float(totals[WH_TOTAL]) / 1000.0
    body["energyThroughputCharge"] = float(totals[WH_CHARGE]) / 1000.0
    body["energyThroughputDischarge"] = float(totals[WH_DISCHARGE]) / 1000.0
    if math.isfinite(rated_ah) and rated_ah > 0.0:
        body["ratedCapacity"] = rated_ah
        body["numberOfFullCycles"] = float(totals[AH_DISCHARGE]) / rated_ah
    _put(body, "bms_soc_pct", sample.bms_soc_pct)
    return body


def _fault_event(channel: int, old: int, new: int) -> dict[str, Any]:
    return {"type": "fault_flags_changed", "fault_flags": new, "previous": old,
            "raised": _bits(new & ~old), "cleared": _bits(old & ~new)}


def _validity_event(subject: str, index_name: str) -> _Describe:
    def describe(channel: int, old: int, new: int) -> dict[str, Any]:
        return {"type": f"{subject}_{'valid' if new else 'invalid'}", index_name: channel}
    return describe


_CELL_VOLTAGE_EVENT = _validity_event("cell_voltage", "cell")
_CELL_TEMP_EVENT = _validity_event("cell_temp", "sensor")


def _bits(flags: int) -> list[int]:
    flags &= (1 << 64) - 1  # the BMS's flags are unsigned; a negative int is its 64-bit pattern
    return [bit for bit in range(flags.bit_length()) if flags >> bit & 1]
