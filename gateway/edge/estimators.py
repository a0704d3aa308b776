"""The estimators of the edge core: SOC, internal resistance, capacity, flags, counters, trends.

:class:`Estimators` runs over one run of a pack's samples (matrices prepared by the edge core,
row 0 the previous sample) and keeps everything in the pack's :class:`PackState`. Per-sample work
is done by the kernels (:mod:`gateway.edge.kernels`); what happens here is per *event* — an
accepted current step, an OCV point, a health record — and is cheap: binning a step, an AWTLS
update, a robust z-score over the cells. The run is cut at its health rows so each health record
reports the estimators as of its own sample (every kernel continues exactly across a cut).

Every figure, its unit and convention is documented in docs/records.md.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from gateway.config import EdgeSection
from gateway.edge import kernels as kn
from gateway.edge.kernels import AH_DISCHARGE, EVENT_CHANNEL, EVENT_NEW, EVENT_ROW, IntArray
from gateway.edge.ocv import CHEMISTRIES, OcvCurve, build_curve, chemistry_of
from gateway.edge.state import (
    BIN_WINDOW,
    LIMIT_CHANNELS,
    LIMIT_COLD,
    LIMIT_DEEP_DISCHARGE,
    LIMIT_HOT,
    LIMIT_OVERCHARGE,
    SOC_BIN_EDGES,
    SOC_BINS,
    TEMP_BIN_EDGES_C,
    TEMP_BINS,
    PackState,
)
from gateway.errors import ConfigError
from gateway.model import BoolArray, FloatArray

GAS_CONSTANT = 8.314462618  # J/(mol·K)

#: An interval between two samples longer than this is a gap in the data: nothing is integrated
#: across it (the current in between is unknown, not zero).
MAX_GAP_S = 10.0

#: A current step only yields R0 when the samples around it are at most this far apart; over
#: longer intervals the voltage change includes too much polarisation to be called ohmic.
MAX_STEP_DT_S = 2.0

#: A fault-flag, validity or limit change is reported once the new value has held this long in
#: measurement time; flicker shorter than that is not an event.
EVENT_HOLD_S = 2.0

#: Step detector (gateway.edge.kernels.dcir_steps): pre-step memory (s); the post-step window
#: lasts up to STEP_POST_MAX_S, at least STEP_POST_MIN_S (s); the post-step level is the mean of
#: the samples within STEP_LEVEL_S of the step (s); the largest R0 believed (Ω). The slope that
#: carries the level back to the step comes from the whole post window: a longer window gives a
#: less noisy slope, a level of a few samples a less noisy voltage.
STEP_PRE_TAU_S = 2.0
STEP_POST_MIN_S = 0.5
STEP_POST_MAX_S = 2.0
STEP_LEVEL_S = 0.25
R0_MAX_OHM = 1.0

#: Smoothing of the rest voltage towards the OCV (s): long enough to average the noise of many
#: samples, short next to ``edge.ocv_rest_s`` so the relaxation's tail does not lag.
REST_VOLTAGE_TAU_S = 120.0

#: σ of an SOC taken from a voltage that may be under load (the very first one).
INITIAL_SOC_SIGMA = 0.05
#: Residual current offset after calibration, as a C-rate (its charge grows with time).
OFFSET_SIGMA_C_RATE = 1e-4

#: Arrhenius fit: results a bin needs, the temperature span the fit needs (K), and the range of
#: activation energies believed (J/mol); outside it the configured value is used.
BIN_MIN_HELD = 3
ARRHENIUS_MIN_SPAN_K = 8.0
ACTIVATION_ENERGY_RANGE = (5_000.0, 100_000.0)

#: A cell's R0 takes part in the baseline, flags and the pack figures with this many estimates.
BASELINE_MIN_STEPS = 10
FLAG_MIN_STEPS = 5
#: The baseline is frozen once this fraction of the cells has enough steps.
BASELINE_CELL_FRACTION = 0.9

#: Self-discharge pairs have at most this much counted charge between the points (C·h), so the
#: SOC drift is the cells' own; it is reported once the pairs span this many hours.
LEAK_MAX_CHARGE_C = 0.01
LEAK_MIN_HOURS = 1.0

#: Flag reasons (bit mask per cell).
FLAG_HIGH_R0, FLAG_LOW_CAPACITY, FLAG_LEAKAGE = 1, 2, 4
FLAG_NAMES = {FLAG_HIGH_R0: "high_resistance", FLAG_LOW_CAPACITY: "low_capacity",
              FLAG_LEAKAGE: "self_discharge"}

#: Decimals in health records: Ω to 0.1 µΩ, Ah to 1 mAh, percent to 0.01, hours to 1 ms.
R0_DECIMALS = 7
AH_DECIMALS = 3
PCT_DECIMALS = 2
HOUR_DECIMALS = 7

#: End of life: state of health thresholds (%) extrapolated along the capacity trend.
END_OF_LIFE_PCT = (80.0, 70.0)
#: Confidence interval of the extrapolations (two-sided 95 %).
Z95 = 1.96

_LIMIT_EVENTS = {LIMIT_DEEP_DISCHARGE: "deep_discharge", LIMIT_OVERCHARGE: "overcharge",
                 LIMIT_HOT: "temperature_high", LIMIT_COLD: "temperature_low"}


@dataclass(frozen=True, slots=True)
class RunInputs:
    """One run of a pack's samples, prepared by the edge core; m + 1 rows, row 0 previous."""

    t: FloatArray
    current_a: FloatArray  # offset-corrected
    rest_s: FloatArray
    volts: FloatArray  # aligned cell voltages
    mask: BoolArray
    raw_volts: FloatArray  # as measured, for the limit channels
    raw_mask: BoolArray
    temps: FloatArray  # per sensor
    temp_mask: BoolArray
    rated_ah: float
    chemistry: str


class Estimators:
    """Settings-derived constants and the per-run estimator pass; state lives in PackState."""

    def __init__(self, settings: EdgeSection) -> None:
        self.settings = settings
        self._custom: OcvCurve | None = None
        if settings.ocv_soc or settings.ocv_voltage_v:
            self._custom = build_curve(settings.ocv_soc, settings.ocv_voltage_v,
                                       key="edge.ocv_soc")
        elif settings.chemistry and chemistry_of(settings.chemistry) is None:
            raise ConfigError(f"has no built-in OCV curve (built in: {', '.join(CHEMISTRIES)}); "
                              f"give the cells' own in edge.ocv_soc and edge.ocv_voltage_v",
                              key="edge.chemistry")
        self._curves: dict[str, OcvCurve | None] = {}
        self._prior_b = float(settings.activation_energy_j_mol) / GAS_CONSTANT
        #: the SOC bin of every row of the bin arrays (rows are temperature bin × SOC_BINS + SOC)
        self._bin_soc: IntArray = np.tile(np.arange(SOC_BINS, dtype=np.int64), TEMP_BINS)

    # -----------------------------------------------------------------------------------------
    # Chemistry

    def chemistry(self, state: PackState) -> str:
        return (self.settings.chemistry or state.bus_chemistry).strip().upper()

    def curve(self, chemistry: str) -> OcvCurve | None:
        """The OCV curve for packs of this chemistry: the configured table, else the built-in."""
        if self._custom is not None:
            return self._custom
        if chemistry not in self._curves:
            known = chemistry_of(chemistry)
            self._curves[chemistry] = (None if known is None
                                       else build_curve(known.ocv_soc, known.ocv_v))
        return self._curves[chemistry]

    def voltage_limits(self, chemistry: str) -> tuple[float, float]:
        """(deep-discharge, overcharge) cell voltages: configured, else the chemistry's."""
        known = chemistry_of(chemistry)
        deep = float(self.settings.deep_discharge_v) or (
            known.deep_discharge_v if known else math.nan)
        over = float(self.settings.overcharge_v) or (known.overcharge_v if known else math.nan)
        return deep, over

    # -----------------------------------------------------------------------------------------
    # The run

    def run(self, state: PackState, run: RunInputs,
            health_rows: Sequence[int]) -> tuple[list[dict[str, Any]],
                                                 dict[int, list[dict[str, Any]]]]:
        """Advance every estimator over the run; health figures at each health row, and events.

        ``health_rows`` are sample indices (array row − 1). Returns the figures for each health
        row, and event items by sample index.
        """
        s = self.settings
        m = run.t.shape[0] - 1
        c = run.volts.shape[1]
        rated = run.rated_ah
        chemistry = run.chemistry
        curve = self.curve(chemistry)
        sensors = run.temps.shape[1]
        temps = np.vstack([np.full((1, sensors), np.nan), run.temps])
        temp_mask = np.vstack([np.zeros((1, sensors), np.bool_), run.temp_mask])
        sensor_of_cell = (np.arange(c) * sensors // c if c else np.zeros(0)).astype(np.int64)
        cell_temps = kn.cell_temperatures(temps, temp_mask, sensor_of_cell)
        min_step_a = float(s.min_step_c_rate) * rated
        charging_a = float(s.rest_current_c_rate) * rated
        if not math.isfinite(charging_a):
            charging_a = 0.0

        events: dict[int, list[dict[str, Any]]] = {}
        limit_events = self._limit_events(state, run, chemistry, events)
        figures: list[dict[str, Any]] = []
        cuts = [h + 1 for h in health_rows]
        stops = cuts if cuts and cuts[-1] == m else [*cuts, m]
        start = 0
        for stop in stops:
            seg = slice(start, stop + 1)
            soc_rows, soc_pack = self._soc(state, run, start, stop, rated, curve)
            if c:
                with _quiet():
                    soc_mean = np.concatenate(([np.nan], np.nanmean(soc_rows, axis=1)))
                step_rows, _, r0, step_temps, step_soc = kn.dcir_steps(
                    run.t[seg], run.current_a[seg], run.volts[seg], run.mask[seg],
                    cell_temps[seg], soc_mean, state.cells, state.pack, min_step_a,
                    MAX_STEP_DT_S, STEP_PRE_TAU_S, STEP_POST_MIN_S, STEP_POST_MAX_S,
                    STEP_LEVEL_S, R0_MAX_OHM)
                kn.rls_update(run.t[seg], run.current_a[seg], run.volts[seg], run.mask[seg],
                              run.rest_s[seg], state.cells, state.pack,
                              float(s.rc_time_constant_s), float(s.rls_memory_s), MAX_GAP_S)
                if step_rows.size:
                    self._accept_steps(state, r0, step_temps, step_soc)
            kn.passport_counters(run.t[seg], run.current_a[seg], temps[seg], temp_mask[seg],
                                 np.concatenate(([np.nan], soc_pack)), state.counters,
                                 float(s.extreme_high_temp_c), float(s.extreme_low_temp_c),
                                 charging_a, MAX_GAP_S)
            for row, channel in limit_events:
                if start <= row < stop:
                    if channel == LIMIT_DEEP_DISCHARGE:
                        state.counters[kn.C_DEEP_DISCHARGE] += 1
                    elif channel == LIMIT_OVERCHARGE:
                        state.counters[kn.C_OVERCHARGE] += 1
            if stop in cuts:
                # Decisions that depend on the estimates are taken at health rows only, which
                # lie where they lie however the samples were batched.
                if c:
                    self._baseline(state, rated)
                    self._resistance_trend(state, rated)
                    flag_items = self._flags(state, rated)
                    if flag_items:
                        events.setdefault(stop - 1, []).extend(flag_items)
                figures.append(self._figures(
                    state, rated, chemistry,
                    soc_rows[-1] if len(soc_rows) else state.cells[:, kn.CH_SOC],
                    float(soc_pack[-1]) if len(soc_pack) else math.nan))
            start = stop
        return figures, events

    def _soc(self, state: PackState, run: RunInputs, start: int, stop: int, rated: float,
             curve: OcvCurve | None) -> tuple[FloatArray, FloatArray]:
        """SOC per cell and of the pack over rows start + 1 … stop, taking OCV points on the way.

        :func:`kernels.soc_track` stops at every OCV point; the capacities are updated before
        counting resumes, wherever the batch ends.
        """
        c = state.cell_count
        if curve is None or not c:
            return np.full((stop - start, c), np.nan), np.full(stop - start, np.nan)
        soc_parts: list[FloatArray] = []
        pack_parts: list[FloatArray] = []
        position = start
        for _ in range(2 * (stop - start) + 1):  # a row is counted, or a point taken before it
            if position >= stop:
                break
            part = slice(position, stop + 1)
            capacity = self._counting_capacity(state, rated)
            soc_rows, pt_rows, pt_soc, pt_v, pt_stats = kn.soc_track(
                run.t[part], run.current_a[part], run.rest_s[part], run.volts[part],
                run.mask[part], curve.soc, curve.volts, capacity, state.cells, state.pack,
                float(self.settings.ocv_rest_s), REST_VOLTAGE_TAU_S, MAX_GAP_S)
            soc_parts.append(soc_rows)
            pack_parts.append(kn.pack_soc(soc_rows, capacity))
            position += soc_rows.shape[0]
            if pt_rows.size:
                self._ocv_points(state, pt_soc, pt_v, pt_stats, rated, curve)
        return np.concatenate(soc_parts), np.concatenate(pack_parts)

    # -----------------------------------------------------------------------------------------

    def _counting_capacity(self, state: PackState, rated: float) -> FloatArray:
        """Per cell, the capacity the SOC is counted with: its estimate, else the rated one."""
        c = state.cell_count
        estimated = state.capacity_ah[:c]
        ok = (state.capacity_updates[:c] > 0) & np.isfinite(estimated) & (estimated > 0.0)
        fallback = rated if math.isfinite(rated) and rated > 0.0 else math.nan
        return np.ascontiguousarray(np.where(ok, estimated, fallback))

    def _limit_events(self, state: PackState, run: RunInputs, chemistry: str,
                      events: dict[int, list[dict[str, Any]]]) -> list[tuple[int, int]]:
        """Debounced limit crossings over the run: event items, and (sample, channel) onsets."""
        deep, over = self.voltage_limits(chemistry)
        raw = run.raw_volts[1:]
        volt_stats, volt_counts = kn.masked_stats(raw, run.raw_mask[1:])
        temp_stats, temp_counts = kn.masked_stats(run.temps, run.temp_mask)
        s = self.settings
        with np.errstate(invalid="ignore"):
            channels = np.stack([
                (volt_counts > 0) & (volt_stats[:, kn.STAT_MIN] < deep),
                (volt_counts > 0) & (volt_stats[:, kn.STAT_MAX] > over),
                (temp_counts > 0) & (temp_stats[:, kn.STAT_MAX] >= s.extreme_high_temp_c),
                (temp_counts > 0) & (temp_stats[:, kn.STAT_MIN] <= s.extreme_low_temp_c),
            ], axis=1).astype(np.int64) if raw.shape[0] else np.zeros((0, LIMIT_CHANNELS),
                                                                         np.int64)
        changes, onsets = kn.debounce(run.t[1:], np.ascontiguousarray(channels),
                                      state.limits.reported, state.limits.candidate,
                                      state.limits.since, EVENT_HOLD_S)
        onset_rows: list[tuple[int, int]] = []
        for change, onset in zip(changes.tolist(), onsets.tolist(), strict=True):
            row, channel, new = change[EVENT_ROW], change[EVENT_CHANNEL], change[EVENT_NEW]
            name = _LIMIT_EVENTS[channel]
            item: dict[str, Any] = {"type": name if new else f"{name}_cleared",
                                    "since": iso_time(onset)}
            limit = {LIMIT_DEEP_DISCHARGE: ("limit_v", deep), LIMIT_OVERCHARGE: ("limit_v", over),
                     LIMIT_HOT: ("limit_c", s.extreme_high_temp_c),
                     LIMIT_COLD: ("limit_c", s.extreme_low_temp_c)}[channel]
            item[limit[0]] = limit[1]
            events.setdefault(row, []).append(item)
            if new:
                onset_rows.append((row, channel))
        return onset_rows

    # -----------------------------------------------------------------------------------------
    # Internal resistance

    def _accept_steps(self, state: PackState, r0: FloatArray, temps: FloatArray,
                      soc: FloatArray) -> None:
        """Put accepted steps into the cells' rings and the pack's temperature × SOC bins."""
        kn.ring_push(state.r0_ring, state.r0_ring_temp_c, state.r0_cell_steps, r0, temps)
        state.r0_steps += int(r0.shape[0])
        with np.errstate(invalid="ignore"), _quiet():
            pack_r0 = np.nanmedian(r0, axis=1)
            pack_temp = np.nanmean(np.where(np.isfinite(r0), temps, np.nan), axis=1)
        for r, temp, level in zip(pack_r0.tolist(), pack_temp.tolist(), soc.tolist(),
                                  strict=True):
            if not (math.isfinite(r) and math.isfinite(temp)):
                continue
            t_bin = int(np.searchsorted(TEMP_BIN_EDGES_C, temp, side="right"))
            s_bin = int(np.searchsorted(SOC_BIN_EDGES, level if math.isfinite(level) else 0.5,
                                        side="right"))
            b = t_bin * SOC_BINS + s_bin
            slot = int(state.r0_bin_held[b] % BIN_WINDOW)
            state.r0_bin_ln[b, slot] = math.log(r)
            state.r0_bin_inv_t[b, slot] = 1.0 / (temp + 273.15)
            state.r0_bin_held[b] += 1
        state.resistance_dirty = True

    def arrhenius(self, state: PackState) -> tuple[float, float, str]:
        """(b = Ea/R in K, its σ, source): the fit over the bins when it holds, else the prior."""
        b, sigma = kn.arrhenius_fit(state.r0_bin_ln, state.r0_bin_inv_t, state.r0_bin_held,
                                    self._bin_soc, SOC_BINS, BIN_MIN_HELD, ARRHENIUS_MIN_SPAN_K)
        lo, hi = (e / GAS_CONSTANT for e in ACTIVATION_ENERGY_RANGE)
        if math.isfinite(b) and lo <= b <= hi:
            return b, sigma, "fit"
        return self._prior_b, math.nan, "configured"

    def r0_now(self, state: PackState) -> tuple[FloatArray, FloatArray]:
        """Per cell R0 at 25 °C and its standard error (NaN without estimates)."""
        b, _, _ = self.arrhenius(state)
        return kn.r0_at_25c(state.r0_ring, state.r0_ring_temp_c, state.r0_cell_steps, b)

    def _baseline(self, state: PackState, rated: float) -> None:
        """Freeze the baseline once the first ``edge.baseline_efc`` cycles are over."""
        c = state.cell_count
        if math.isfinite(state.r0_baseline[c]) or not (math.isfinite(rated) and rated > 0.0):
            return
        efc = state.totals[AH_DISCHARGE] / rated
        enough = state.r0_cell_steps >= BASELINE_MIN_STEPS
        if efc < self.settings.baseline_efc or enough.sum() < BASELINE_CELL_FRACTION * c:
            return
        r0, _ = self.r0_now(state)
        state.r0_baseline[:c] = np.where(enough, r0, np.nan)
        state.r0_baseline[c] = float(np.nanmean(state.r0_baseline[:c]))
        state.pack[kn.P_TREND_STEPS] = state.r0_steps
        state.resistance_dirty = True

    def _resistance_trend(self, state: PackState, rated: float) -> None:
        """A point of the resistance trend, once per health record that follows new steps."""
        if state.r0_steps <= state.pack[kn.P_TREND_STEPS] or not (
                math.isfinite(rated) and rated > 0.0):
            return
        r0, sigma = self.r0_now(state)
        increase, _, _ = self._resistance_increase(state, r0, sigma)
        if math.isfinite(increase):
            _trend_add(state.r0_trend, float(state.totals[AH_DISCHARGE]) / rated, increase)
            state.pack[kn.P_TREND_STEPS] = state.r0_steps
            state.resistance_dirty = True

    def _resistance_increase(self, state: PackState, r0: FloatArray,
                             sigma: FloatArray) -> tuple[float, float, FloatArray]:
        """Pack increase (%) over the baseline and its σ, and per cell (%, NaN: unknown)."""
        c = state.cell_count
        base = state.r0_baseline[:c]
        with np.errstate(invalid="ignore", divide="ignore"):
            cells = 100.0 * (r0 / base - 1.0)
        both = np.isfinite(base) & np.isfinite(r0)
        if not both.any():
            return math.nan, math.nan, cells
        now = float(r0[both].mean())
        then = float(base[both].mean())
        spread = sigma[both]
        rel = float(np.sqrt(np.nansum(spread ** 2)) / both.sum() / now) if now > 0 else math.nan
        return 100.0 * (now / then - 1.0), 100.0 * (now / then) * rel, cells

    # -----------------------------------------------------------------------------------------
    # Capacity and self-discharge

    def _ocv_points(self, state: PackState, point_soc: FloatArray, point_v: FloatArray,
                    stats: FloatArray, rated: float, curve: OcvCurve) -> None:
        """Capacity (a pair with enough ΔSOC) or self-discharge (a rest) from each OCV point."""
        s = self.settings
        for p in range(point_soc.shape[0]):
            soc_now = point_soc[p]
            with np.errstate(invalid="ignore"):
                slope = np.interp(np.clip(soc_now, 0.0, 1.0), curve.soc, curve.slope)
                sigma_now = np.where(np.isfinite(point_v[p]),
                                     float(s.ocv_sigma_v) / np.maximum(slope, 1e-6), np.nan)
            ok = stats[p, kn.PT_OK] > 0.5
            charge = float(stats[p, kn.PT_AH])
            hours = float(stats[p, kn.PT_SECONDS]) / 3600.0
            x = state.anchor_soc - soc_now
            var_x = state.anchor_sigma ** 2 + sigma_now ** 2
            usable = np.isfinite(x) & np.isfinite(var_x)
            if ok and usable.any() and math.isfinite(rated) and rated > 0.0:
                mean_x = float(x[usable].mean())
                if abs(mean_x) >= s.capacity_min_delta_soc:
                    self._capacity_update(state, x, var_x, usable, charge,
                                          float(stats[p, kn.PT_ABS_AH]), hours, rated)
                elif abs(charge) <= LEAK_MAX_CHARGE_C * rated:
                    capacity = self._counting_capacity(state, rated)
                    unexplained = capacity * x - charge
                    drift = unexplained - float(np.median(unexplained[usable]))
                    state.leak_ah += np.where(usable, drift, 0.0)
                    state.leak_hours += hours
            state.anchor_soc = np.where(np.isfinite(sigma_now), soc_now, np.nan)
            state.anchor_sigma = sigma_now
            state.capacity_dirty = True

    def _capacity_update(self, state: PackState, x: FloatArray, var_x: FloatArray,
                         usable: BoolArray, charge: float, abs_charge: float, hours: float,
                         rated: float) -> None:
        s = self.settings
        c = state.cell_count
        var_y = ((float(s.current_gain_sigma) * abs_charge) ** 2
                 + (OFFSET_SIGMA_C_RATE * rated * hours) ** 2)
        xs = np.append(np.where(usable, x, np.nan), float(x[usable].mean()))
        var_xs = np.append(var_x, float(var_x[usable].mean()) / max(int(usable.sum()), 1))
        update = np.append(usable, True)
        ys = np.full(c + 1, charge)
        q, var_q = kn.awtls_update(state.awtls, np.ascontiguousarray(xs), ys,
                                   np.ascontiguousarray(var_xs), np.full(c + 1, var_y),
                                   float(s.capacity_forgetting), update)
        known = np.isfinite(q)
        state.capacity_ah = np.where(known, q, state.capacity_ah)
        state.capacity_var = np.where(known, var_q, state.capacity_var)
        state.capacity_updates += update.astype(np.int64)
        remaining, _ = self._remaining(state)
        if math.isfinite(remaining):
            _trend_add(state.capacity_trend, state.totals[AH_DISCHARGE] / rated,
                       100.0 * remaining / rated)

    def _remaining(self, state: PackState) -> tuple[float, float]:
        """The string's capacity: its weakest cell's estimate (Ah), and that estimate's σ."""
        c = state.cell_count
        known = (state.capacity_updates[:c] > 0) & np.isfinite(state.capacity_ah[:c])
        if not known.any():
            return math.nan, math.nan
        cells = np.where(known, state.capacity_ah[:c], np.inf)
        weakest = int(np.argmin(cells))
        return float(cells[weakest]), float(np.sqrt(state.capacity_var[weakest]))

    # -----------------------------------------------------------------------------------------
    # Flags

    def _flags(self, state: PackState, rated: float) -> list[dict[str, Any]]:
        """Cells whose R0, capacity or self-discharge stands out; events for every change."""
        s = self.settings
        c = state.cell_count
        r0, _ = self.r0_now(state)
        z_r0, med_r0, _ = kn.robust_z(r0, state.r0_cell_steps >= FLAG_MIN_STEPS)
        cap = state.capacity_ah[:c]
        z_cap, med_cap, _ = kn.robust_z(np.ascontiguousarray(cap), state.capacity_updates[:c] > 0)
        leak = (state.leak_ah / state.leak_hours if state.leak_hours >= LEAK_MIN_HOURS
                else np.full(c, np.nan))
        z_leak, _, _ = kn.robust_z(np.ascontiguousarray(leak), np.isfinite(leak))
        # Hysteresis: a flagged cell keeps its flag while it stays beyond half the thresholds,
        # so an estimate that wanders about the limit does not raise an event each time.
        held = np.where(state.flags != 0, 0.5, 1.0)
        threshold = float(s.flag_z_score) * held
        with np.errstate(invalid="ignore", divide="ignore"):
            high_r0 = ((z_r0 >= threshold)
                       & (r0 / med_r0 - 1.0 >= s.flag_r0_increase * held))
            low_cap = ((z_cap <= -threshold)
                       & (1.0 - cap / med_cap >= s.flag_capacity_decrease * held))
            leaky = (z_leak >= threshold) & (leak >= s.flag_leakage_c_rate * rated * held)
        flags = (np.where(high_r0, FLAG_HIGH_R0, 0) | np.where(low_cap, FLAG_LOW_CAPACITY, 0)
                 | np.where(leaky, FLAG_LEAKAGE, 0)).astype(np.int64)
        items: list[dict[str, Any]] = []
        for j in np.flatnonzero(flags != state.flags).tolist():
            raised = int(flags[j] & ~state.flags[j])
            cleared = int(state.flags[j] & ~flags[j])
            item: dict[str, Any] = {"type": "cell_flagged" if flags[j] else "cell_unflagged",
                                    "cell": j, "reasons": _flag_names(int(flags[j]))}
            if raised:
                item["raised"] = _flag_names(raised)
            if cleared:
                item["cleared"] = _flag_names(cleared)
            for key, z in (("r0_z", z_r0), ("capacity_z", z_cap), ("self_discharge_z", z_leak)):
                if math.isfinite(z[j]):
                    item[key] = round(float(z[j]), 2)
            items.append(item)
        if items:
            state.flags = flags
        return items

    # -----------------------------------------------------------------------------------------
    # Health figures

    def _figures(self, state: PackState, rated: float, chemistry: str, soc_cells: FloatArray,
                 soc_pack: float) -> dict[str, Any]:
        s = self.settings
        c = state.cell_count
        body: dict[str, Any] = {}
        if chemistry:
            body["chemistry"] = chemistry
        has_rated = math.isfinite(rated) and rated > 0.0
        efc = float(state.totals[AH_DISCHARGE]) / rated if has_rated else math.nan

        # State of charge
        if math.isfinite(soc_pack):
            body["stateOfCharge"] = round(100.0 * soc_pack, PCT_DECIMALS)
            sigma = self._soc_sigma(state, rated)
            if math.isfinite(sigma):
                body["stateOfChargeSigma"] = round(100.0 * sigma, PCT_DECIMALS)
        if c and np.isfinite(soc_cells).any():
            body["soc_cells_pct"] = _cells(100.0 * soc_cells, PCT_DECIMALS)

        # Capacity and state of health
        remaining, remaining_sigma = self._remaining(state)
        if math.isfinite(remaining) and has_rated:
            body["remainingCapacity"] = round(remaining, AH_DECIMALS)
            _known(body, "remainingCapacitySigma", remaining_sigma, AH_DECIMALS)
            body["stateOfHealth"] = round(100.0 * remaining / rated, PCT_DECIMALS)
            _known(body, "stateOfHealthSigma", 100.0 * remaining_sigma / rated, PCT_DECIMALS)
            body["capacityFade"] = round(100.0 * (1.0 - remaining / rated), PCT_DECIMALS)
        if c and (state.capacity_updates > 0).any():
            known = state.capacity_updates[:c] > 0
            capacity: dict[str, Any] = {
                "cells": _cells(np.where(known, state.capacity_ah[:c], np.nan), AH_DECIMALS),
                "cells_sigma": _cells(np.where(known, np.sqrt(state.capacity_var[:c]), np.nan),
                                      AH_DECIMALS),
                "updates": int(state.capacity_updates[c])}
            if math.isfinite(state.capacity_ah[c]):
                capacity["pack_mean"] = round(float(state.capacity_ah[c]), AH_DECIMALS)
                _known(capacity, "pack_mean_sigma", math.sqrt(state.capacity_var[c]),
                       AH_DECIMALS)
            body["capacity_ah"] = capacity

        # Internal resistance
        if c:
            r0, r0_sigma = self.r0_now(state)
            if np.isfinite(r0).any():
                resistance: dict[str, Any] = {"cells": _cells(r0, R0_DECIMALS),
                                              "cells_sigma": _cells(r0_sigma, R0_DECIMALS)}
                if np.isfinite(r0).all():
                    resistance["pack"] = round(float(r0.sum()), R0_DECIMALS)
                    if np.isfinite(r0_sigma).all():
                        resistance["pack_sigma"] = round(
                            float(np.sqrt((r0_sigma ** 2).sum())), R0_DECIMALS)
                body["r0_25c_ohm"] = resistance
            body["r0_steps"] = state.r0_steps
            b, b_sigma, source = self.arrhenius(state)
            body["r0ActivationEnergy"] = round(b * GAS_CONSTANT, 0)
            if math.isfinite(b_sigma):
                body["r0ActivationEnergySigma"] = round(b_sigma * GAS_CONSTANT, 0)
            body["r0ActivationEnergySource"] = source
            bins = self._bins(state)
            if bins:
                body["r0_bins"] = bins
            increase, increase_sigma, per_cell = self._resistance_increase(state, r0, r0_sigma)
            if math.isfinite(increase):
                body["internalResistanceIncrease"] = round(increase, PCT_DECIMALS)
                if math.isfinite(increase_sigma):
                    body["internalResistanceIncreaseSigma"] = round(increase_sigma,
                                                                    PCT_DECIMALS)
                body["internalResistanceIncreaseCells"] = _cells(per_cell, PCT_DECIMALS)
                body["r0_baseline_25c_ohm"] = {
                    "cells": _cells(state.r0_baseline[:c], R0_DECIMALS),
                    "pack": round(float(np.nansum(state.r0_baseline[:c])), R0_DECIMALS)}
            rls = self._rls(state)
            if rls:
                body["r0_rls_ohm"] = rls

        # Passport counters
        counters = state.counters
        body["temperatureInformation"] = {
            "timeExtremeHighTemp": _hours(counters[kn.C_TIME_HIGH]),
            "timeExtremeLowTemp": _hours(counters[kn.C_TIME_LOW]),
            "timeExtremeHighTempCharging": _hours(counters[kn.C_TIME_HIGH_CHARGING]),
            "timeExtremeLowTempCharging": _hours(counters[kn.C_TIME_LOW_CHARGING]),
            "extremeHighTempLimit": float(s.extreme_high_temp_c),
            "extremeLowTempLimit": float(s.extreme_low_temp_c)}
        deep, over = self.voltage_limits(chemistry)
        negative: dict[str, Any] = {"deepDischarge": int(counters[kn.C_DEEP_DISCHARGE]),
                                    "overcharge": int(counters[kn.C_OVERCHARGE])}
        if math.isfinite(deep):
            negative["deepDischargeLimit"] = deep
        if math.isfinite(over):
            negative["overchargeLimit"] = over
        body["negativeEvents"] = negative
        body["soc_histogram_h"] = [_hours(x) for x in
                                   counters[kn.C_SOC_HIST:kn.C_SOC_HIST + kn.SOC_BINS]]
        body["temperature_histogram_h"] = [_hours(x) for x in
                                           counters[kn.C_TEMP_HIST:kn.C_TEMP_HIST + kn.TEMP_BINS]]

        # Imbalance, self-discharge, flags
        if c:
            imbalance: dict[str, Any] = {}
            if np.isfinite(soc_cells).sum() >= 1:
                with _quiet():
                    median = float(np.nanmedian(soc_cells))
                imbalance["soc_deviation_pct"] = _cells(100.0 * (soc_cells - median),
                                                        PCT_DECIMALS)
            if state.leak_hours >= LEAK_MIN_HOURS:
                imbalance["self_discharge_a"] = _cells(state.leak_ah / state.leak_hours, 5)
                imbalance["self_discharge_hours"] = round(state.leak_hours, 3)
            if imbalance:
                body["imbalance"] = imbalance
            body["flaggedCells"] = [{"cell": j, "reasons": _flag_names(int(state.flags[j]))}
                                    for j in np.flatnonzero(state.flags).tolist()]
        offset = float(state.pack[kn.P_OFFSET_A])
        if offset != 0.0:
            body["current_offset_a"] = round(offset, 4)

        # Trends
        trend = self._trend(state, efc)
        if trend:
            body["trend"] = trend
        return body

    def _soc_sigma(self, state: PackState, rated: float) -> float:
        """σ of the pack SOC: the last OCV point's, grown by the charge counted since."""
        with _quiet():
            anchor = float(np.nanmedian(state.anchor_sigma)) if state.anchor_sigma.size else (
                math.nan)
        if not math.isfinite(anchor):
            anchor = INITIAL_SOC_SIGMA
        if not (math.isfinite(rated) and rated > 0.0):
            return math.nan
        counted = float(self.settings.current_gain_sigma) * state.pack[kn.P_ANCHOR_ABS_AH] / rated
        since = state.last_ts - state.pack[kn.P_ANCHOR_TS]
        drift = (OFFSET_SIGMA_C_RATE * since / 3600.0) if math.isfinite(since) else 0.0
        return math.sqrt(anchor ** 2 + counted ** 2 + drift ** 2)

    def _bins(self, state: PackState) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        t_edges = (-math.inf, *TEMP_BIN_EDGES_C, math.inf)
        s_edges = (0.0, *SOC_BIN_EDGES, 1.0)
        for b in np.flatnonzero(state.r0_bin_held).tolist():
            held = int(min(state.r0_bin_held[b], BIN_WINDOW))
            t_bin, s_bin = divmod(b, SOC_BINS)
            out.append({
                "temp_c": [_edge(t_edges[t_bin]), _edge(t_edges[t_bin + 1])],
                "soc_pct": [round(100 * s_edges[s_bin]), round(100 * s_edges[s_bin + 1])],
                "r0_ohm": round(math.exp(float(np.median(state.r0_bin_ln[b, :held]))),
                                R0_DECIMALS),
                "steps": int(state.r0_bin_held[b])})
        return out

    def _rls(self, state: PackState) -> dict[str, Any]:
        cells = state.cells
        e2 = cells[:, kn.CH_RLS_E2]
        known = np.isfinite(e2)
        if not known.any():
            return {}
        r0 = np.where(known, cells[:, kn.CH_RLS_R0], np.nan)
        p00 = float(state.pack[kn.P_RLS_P])
        sigma = np.sqrt(np.maximum(p00, 0.0) * np.where(known, e2, np.nan))
        out: dict[str, Any] = {"cells": _cells(r0, R0_DECIMALS),
                               "cells_sigma": _cells(sigma, R0_DECIMALS)}
        if known.all():
            _known(out, "pack", float(r0.sum()), R0_DECIMALS)
        return out

    def _trend(self, state: PackState, efc: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        fit = _trend_fit(state.capacity_trend)
        if fit is not None:
            a, b, var_a, var_b, cov = fit
            out["capacityFadeRate"] = round(-b, 5)  # % of rated per full cycle
            if math.isfinite(var_b):
                out["capacityFadeRateSigma"] = round(math.sqrt(var_b), 5)
            for level in END_OF_LIFE_PCT:
                eol = _end_of_life(a, b, var_a, var_b, cov, level, efc)
                if eol is not None:
                    out[f"endOfLife{int(level)}"] = eol
        fit = _trend_fit(state.r0_trend)
        if fit is not None:
            _, b, _, var_b, _ = fit
            out["resistanceIncreaseRate"] = round(b, 5)  # percentage points per full cycle
            if math.isfinite(var_b):
                out["resistanceIncreaseRateSigma"] = round(math.sqrt(var_b), 5)
        return out


# ---------------------------------------------------------------------------------------------
# Helpers

def iso_time(ts: float) -> str:
    """POSIX seconds as ISO 8601 UTC with milliseconds (``2025-01-02T03:04:05.678Z``)."""
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence NumPy's warnings for all-NaN slices: those give NaN, which is the answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _trend_add(sums: FloatArray, x: float, y: float) -> None:
    if math.isfinite(x) and math.isfinite(y):
        sums += (1.0, x, y, x * x, x * y, y * y)


def _trend_fit(sums: FloatArray) -> tuple[float, float, float, float, float] | None:
    """Least-squares line y = a + b·x from the sums: (a, b, var a, var b, cov a b)."""
    n, sx, sy, sxx, sxy, syy = (float(v) for v in sums)
    if n < 3:
        return None
    det = n * sxx - sx * sx
    if det <= 1e-12 * max(n * sxx, 1e-300):
        return None
    b = (n * sxy - sx * sy) / det
    a = (sy - b * sx) / n
    residual = max(syy - a * sy - b * sxy, 0.0)
    var = residual / (n - 2) if n > 2 else math.nan
    return a, b, var * sxx / det, var * n / det, -var * sx / det


def _end_of_life(a: float, b: float, var_a: float, var_b: float, cov: float, level: float,
                 efc: float) -> dict[str, Any] | None:
    """Full cycles at which the trend reaches ``level`` % SOH, with a 95 % interval."""
    if not (b < 0.0 and math.isfinite(var_b) and b + Z95 * math.sqrt(var_b) < 0.0):
        return None  # no significant fade: no end of life to extrapolate to
    at = (level - a) / b
    # delta method: ∂x/∂a = −1/b, ∂x/∂b = −(level − a)/b²
    da, db = -1.0 / b, -(level - a) / (b * b)
    var = da * da * var_a + db * db * var_b + 2.0 * da * db * cov
    half = Z95 * math.sqrt(max(var, 0.0))
    lower = max(at - half, efc) if math.isfinite(efc) else at - half
    return {"numberOfFullCycles": round(at, 1), "interval": [round(lower, 1),
                                                             round(at + half, 1)]}


def _known(body: dict[str, Any], key: str, value: float, decimals: int) -> None:
    """Set a figure only when it is known: JSON has no NaN."""
    if math.isfinite(value):
        body[key] = round(value, decimals)


def _cells(values: FloatArray, decimals: int) -> list[float | None]:
    out: list[float | None] = []
    for v in np.asarray(values, dtype=np.float64).tolist():
        out.append(round(v, decimals) if math.isfinite(v) else None)
    return out


def _hours(seconds: float) -> float:
    return round(float(seconds) / 3600.0, HOUR_DECIMALS)


def _edge(value: float) -> float | None:
    return None if math.isinf(value) else value


def _flag_names(mask: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES.items() if mask & bit]
