"""Plain-NumPy twins of the numba kernels in :mod:`gateway.edge.kernels`.

Each function has the same name, signature, result and in-place state updates as its kernel,
written the obvious NumPy way rather than the fast way. The property tests run both on generated
inputs and require them to agree; the benchmark measures what compiling buys. The daemon never
calls these.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from gateway.edge import kernels as kn
from gateway.edge.kernels import (
    AH_CHARGE,
    AH_DISCHARGE,
    AH_TOTAL,
    STAT_MAX,
    STAT_MEAN,
    STAT_MIN,
    STAT_SPREAD,
    THROUGHPUT_COLUMNS,
    WH_CHARGE,
    WH_DISCHARGE,
    WH_TOTAL,
    IntArray,
)
from gateway.model import BoolArray, FloatArray

_SECONDS_PER_HOUR = 3600.0


def mask_plausible(values: FloatArray, valid: BoolArray, lo: float,
                   hi: float) -> tuple[BoolArray, int]:
    with np.errstate(invalid="ignore"):
        mask = valid & (values >= lo) & (values <= hi)
    return mask, int(np.count_nonzero(valid & ~mask))


def masked_stats(values: FloatArray, mask: BoolArray) -> tuple[FloatArray, IntArray]:
    counts = np.count_nonzero(mask, axis=1).astype(np.int64)
    stats = np.full((values.shape[0], 4), np.nan)
    has = counts > 0
    lo = np.where(mask, values, np.inf).min(axis=1, initial=np.inf)
    hi = np.where(mask, values, -np.inf).max(axis=1, initial=-np.inf)
    total = np.where(mask, values, 0.0).sum(axis=1)
    stats[has, STAT_MIN] = lo[has]
    stats[has, STAT_MAX] = hi[has]
    stats[has, STAT_MEAN] = total[has] / counts[has]
    stats[has, STAT_SPREAD] = hi[has] - lo[has]
    return stats, counts


def _positive_area(a: FloatArray, b: FloatArray, dt: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        both_positive = (a >= 0.0) & (b >= 0.0)
        both_negative = (a <= 0.0) & (b <= 0.0)
        crossing = ~both_positive & ~both_negative
        area = np.where(both_positive, 0.5 * dt * (a + b), 0.0)
        area = np.where(crossing & (a > 0.0), 0.5 * dt * a * a / (a - b), area)
        area = np.where(crossing & ~(a > 0.0), 0.5 * dt * b * b / (b - a), area)
    return area


def integrate_throughput(t: FloatArray, current_a: FloatArray, pack_voltage_v: FloatArray,
                         totals: FloatArray, max_gap_s: float) -> FloatArray:
    n = t.shape[0]
    if n == 0:
        return np.empty((0, THROUGHPUT_COLUMNS))
    dt = np.diff(t)
    i0, i1 = current_a[:-1], current_a[1:]
    with np.errstate(invalid="ignore"):
        ok = (dt > 0.0) & (dt <= max_gap_s) & np.isfinite(i0) & np.isfinite(i1)
        p0, p1 = pack_voltage_v[:-1] * i0, pack_voltage_v[1:] * i1
    ok_power = ok & np.isfinite(p0) & np.isfinite(p1)
    increments = np.zeros((n - 1, THROUGHPUT_COLUMNS))
    for columns, a, b, where in (((AH_CHARGE, AH_DISCHARGE, AH_TOTAL), i0, i1, ok),
                                 ((WH_CHARGE, WH_DISCHARGE, WH_TOTAL), p0, p1, ok_power)):
        discharge = _positive_area(a, b, dt)
        charge = _positive_area(-a, -b, dt)
        increments[where, columns[0]] = charge[where] / _SECONDS_PER_HOUR
        increments[where, columns[1]] = discharge[where] / _SECONDS_PER_HOUR
        increments[where, columns[2]] = (charge[where] + discharge[where]) / _SECONDS_PER_HOUR
    out: FloatArray = np.cumsum(np.vstack([totals[None, :], increments]), axis=0)
    return out


def interval_ticks(t: FloatArray, origin: float, interval_s: float,
                   last_tick: float) -> tuple[BoolArray, float]:
    def bucket(x: FloatArray) -> FloatArray:
        return np.floor((x - origin) / interval_s) if interval_s > 0.0 else x.astype(np.float64)

    buckets = bucket(t)
    running = np.fmax.accumulate(np.concatenate((bucket(np.array([last_tick])), buckets)))
    ticks = buckets > running[:-1]
    return ticks, float(t[ticks][-1]) if ticks.any() else last_tick


def debounce(t: FloatArray, values: IntArray, reported: IntArray, candidate: IntArray,
             since: FloatArray, hold_s: float) -> tuple[IntArray, FloatArray]:
    events: list[tuple[int, int, int, int]] = []
    onsets: list[float] = []
    for i in range(values.shape[0]):
        x = values[i]
        unchanged = x == reported
        since[unchanged] = np.nan
        fresh = ~unchanged & (np.isnan(since) | (x != candidate))
        candidate[fresh] = x[fresh]
        since[fresh] = t[i]
        confirmed = ~unchanged & (t[i] - since >= hold_s)
        for j in np.flatnonzero(confirmed):
            events.append((i, int(j), int(reported[j]), int(x[j])))
            onsets.append(float(since[j]))
        reported[confirmed] = x[confirmed]
        since[confirmed] = np.nan
    return np.array(events, dtype=np.int64).reshape(-1, 4), np.array(onsets, dtype=np.float64)


def mask_jumps_and_stuck(volts: FloatArray, mask: BoolArray, stuck_ref: FloatArray,
                         stuck_dv: float, jump_v: float) -> tuple[BoolArray, int, int]:
    n = volts.shape[0]
    stuck = jumped = 0
    for row in range(1, n):
        now, before = volts[row], volts[row - 1]
        valid, was_valid = mask[row].copy(), mask[row - 1]
        both = valid & was_valid
        mean_delta = float((now - before)[both].mean()) if both.any() else 0.0
        jump = both & (np.abs(now - before - mean_delta) > jump_v)
        steady = valid & ~jump
        mean = float(now[steady].mean()) if steady.any() else np.nan
        same = steady & (now == before)
        fresh = same & np.isnan(stuck_ref)
        stuck_ref[fresh] = mean
        is_stuck = same & ~fresh & (np.abs(mean - stuck_ref) > stuck_dv)
        stuck_ref[steady & ~same] = mean
        jumped += int(jump.sum())
        stuck += int(is_stuck.sum())
        mask[row] = steady & ~is_stuck
    out: BoolArray = mask[1:].copy()
    return out, stuck, jumped


def condition_current(t: FloatArray, current_a: FloatArray, rest_band_a: float,
                      rest_settle_s: float, max_gap_s: float,
                      pack: FloatArray) -> tuple[FloatArray, FloatArray]:
    n = t.shape[0]
    corrected = np.empty(n)
    rest_s = np.full(n, -1.0)
    if n == 0:
        return corrected, rest_s
    corrected[0] = pack[kn.P_LAST_I_CORR]
    for row in range(1, n):
        i = current_a[row]
        if not np.isfinite(i):
            pack[kn.P_REST_SINCE] = np.nan
            corrected[row] = np.nan
            continue
        dt = t[row] - t[row - 1]
        if abs(i - pack[kn.P_OFFSET_A]) <= rest_band_a:
            if np.isnan(pack[kn.P_REST_SINCE]) or not 0.0 < dt <= max_gap_s:
                pack[[kn.P_REST_SINCE, kn.P_REST_SUM, kn.P_REST_N]] = (t[row], 0.0, 0.0)
            rest_s[row] = t[row] - pack[kn.P_REST_SINCE]
            if rest_s[row] >= rest_settle_s:
                pack[kn.P_REST_SUM] += i
                pack[kn.P_REST_N] += 1.0
                pack[kn.P_OFFSET_A] = pack[kn.P_REST_SUM] / pack[kn.P_REST_N]
        else:
            pack[kn.P_REST_SINCE] = np.nan
        corrected[row] = i - pack[kn.P_OFFSET_A]
    pack[kn.P_LAST_I_CORR] = corrected[-1]
    return corrected, rest_s


def align_cells(t: FloatArray, volts: FloatArray, mask: BoolArray,
                lag_s: float) -> tuple[FloatArray, BoolArray]:
    if volts.shape[0] < 2:
        return np.empty((0, volts.shape[1])), np.empty((0, volts.shape[1]), np.bool_)
    dt = np.diff(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        back = np.where((lag_s > 0.0) & (dt > 0.0), np.minimum(lag_s / dt, 1.0), 0.0)
    back = np.nan_to_num(back)[:, None]
    now, before = volts[1:], volts[:-1]
    out = np.where(back == 0.0, now, now - back * (now - before))
    valid = np.where(back == 0.0, mask[1:], mask[1:] & mask[:-1])
    return out, valid


def cell_temperatures(temps: FloatArray, temp_mask: BoolArray,
                      sensor_of_cell: IntArray) -> FloatArray:
    n, s = temps.shape
    counts = temp_mask.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(temp_mask, temps, 0.0).sum(axis=1) / counts
    own = (sensor_of_cell >= 0) & (sensor_of_cell < s)
    index = np.where(own, sensor_of_cell, 0)
    picked = temps[:, index] if s else np.zeros((n, sensor_of_cell.size))
    picked_ok = (temp_mask[:, index] & own[None, :]) if s else np.zeros(picked.shape, np.bool_)
    out = np.where(picked_ok, picked, mean[:, None])
    out[counts == 0] = np.nan
    return out


def soc_track(t: FloatArray, current_a: FloatArray, rest_s: FloatArray, volts: FloatArray,
              mask: BoolArray, curve_soc: FloatArray, curve_v: FloatArray,
              capacity_ah: FloatArray, cells: FloatArray, pack: FloatArray, ocv_rest_s: float,
              rest_tau_s: float, max_gap_s: float,
              ) -> tuple[FloatArray, IntArray, FloatArray, FloatArray, FloatArray]:
    n, c = volts.shape
    soc, vrest = cells[:, kn.CH_SOC], cells[:, kn.CH_VREST]  # views: updates land in ``cells``
    soc_rows = np.empty((max(n - 1, 0), c))
    rows: list[int] = []
    points_soc: list[FloatArray] = []
    points_v: list[FloatArray] = []
    stats: list[list[float]] = []
    counted = capacity_ah > 0.0
    for row in range(1, n):
        dt = t[row] - t[row - 1]
        rs = rest_s[row]
        relaxed = pack[kn.P_RELAXED] > 0.5
        if relaxed and (rs <= 0.0 or rs >= pack[kn.P_NEXT_POINT_S]):
            rows.append(row - 1)
            points_soc.append(soc.copy())
            points_v.append(vrest.copy())
            stats.append([pack[kn.P_ANCHOR_AH], pack[kn.P_ANCHOR_ABS_AH],
                          t[row - 1] - pack[kn.P_ANCHOR_TS], pack[kn.P_ANCHOR_OK]])
            pack[[kn.P_ANCHOR_AH, kn.P_ANCHOR_ABS_AH, kn.P_ANCHOR_TS, kn.P_ANCHOR_OK]] = (
                0.0, 0.0, t[row - 1], 1.0)
            if rs <= 0.0:
                pack[kn.P_RELAXED] = 0.0
            else:
                pack[kn.P_NEXT_POINT_S] = rs + ocv_rest_s
            soc_rows = soc_rows[:row - 1]
            break
        i0, i1 = current_a[row - 1], current_a[row]
        if 0.0 < dt <= max_gap_s and np.isfinite(i0) and np.isfinite(i1):
            ah = 0.5 * (i0 + i1) * dt / 3600.0
            soc[counted] -= ah / capacity_ah[counted]
            pack[kn.P_ANCHOR_AH] += ah
            pack[kn.P_ANCHOR_ABS_AH] += 0.5 * (abs(i0) + abs(i1)) * dt / 3600.0
        elif np.isfinite(t[row - 1]):
            pack[kn.P_ANCHOR_OK] = 0.0
        if rs >= 0.0:
            if rs == 0.0:
                vrest[:] = np.nan
            alpha = 1.0 if rs == 0.0 else 1.0 - np.exp(-dt / rest_tau_s)
            ok = mask[row]
            vrest[ok] = np.where(np.isnan(vrest[ok]), volts[row, ok],
                                 vrest[ok] + alpha * (volts[row, ok] - vrest[ok]))
            if rs >= ocv_rest_s:
                known = np.isfinite(vrest)
                soc[known] = np.interp(vrest[known], curve_v, curve_soc)
                if pack[kn.P_RELAXED] < 0.5:
                    pack[kn.P_RELAXED] = 1.0
                    pack[kn.P_NEXT_POINT_S] = rs + ocv_rest_s
        first = np.isnan(soc) & mask[row]
        soc[first] = np.interp(volts[row, first], curve_v, curve_soc)
        soc_rows[row - 1] = soc
    return (soc_rows, np.array(rows, dtype=np.int64),
            np.array(points_soc).reshape(-1, c), np.array(points_v).reshape(-1, c),
            np.array(stats, dtype=np.float64).reshape(-1, 4))


def pack_soc(soc: FloatArray, capacity_ah: FloatArray) -> FloatArray:
    if soc.shape[1] == 0:
        return np.full(soc.shape[0], np.nan)
    clipped = np.clip(soc, 0.0, 1.0)
    out_ah = (clipped * capacity_ah).min(axis=1)
    in_ah = ((1.0 - clipped) * capacity_ah).min(axis=1)
    ok = np.isfinite(soc).all(axis=1) & (capacity_ah > 0.0).all() & (out_ah + in_ah > 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, out_ah / (out_ah + in_ah), np.nan)


class _Window:
    """The DC-IR detector's window sums, as views into the state arrays."""

    def __init__(self, cells: FloatArray, pack: FloatArray) -> None:
        self.cells, self.pack = cells, pack

    def restart(self, row: int, t: FloatArray, current_a: FloatArray, volts: FloatArray,
                mask: BoolArray) -> None:
        self.pack[[kn.P_STEP_PHASE, kn.P_STEP_TREF, kn.P_STEP_S1, kn.P_STEP_ST, kn.P_STEP_STT,
                   kn.P_STEP_SI, kn.P_STEP_N]] = (0.0, t[row], 0.0, 0.0, 0.0, 0.0, 0.0)
        self.cells[:, [kn.CH_STEP_SV, kn.CH_STEP_STV, kn.CH_STEP_TAINT]] = 0.0
        if np.isfinite(current_a[row]):
            self.add(row, t, current_a, volts, mask, 1.0)

    def add(self, row: int, t: FloatArray, current_a: FloatArray, volts: FloatArray,
            mask: BoolArray, discount: float) -> None:
        x = t[row] - self.pack[kn.P_STEP_TREF]
        sums = [kn.P_STEP_S1, kn.P_STEP_ST, kn.P_STEP_STT, kn.P_STEP_SI]
        self.pack[sums] = discount * self.pack[sums] + (1.0, x, x * x, current_a[row])
        self.pack[kn.P_STEP_N] += 1.0
        ok = mask[row] & np.isfinite(volts[row])
        v = volts[row]
        self.cells[ok, kn.CH_STEP_SV] = discount * self.cells[ok, kn.CH_STEP_SV] + v[ok]
        self.cells[ok, kn.CH_STEP_STV] = discount * self.cells[ok, kn.CH_STEP_STV] + x * v[ok]
        self.cells[~ok, kn.CH_STEP_TAINT] = 1.0

    def line(self, at: float) -> tuple[FloatArray, FloatArray]:
        s1, st, stt = self.pack[[kn.P_STEP_S1, kn.P_STEP_ST, kn.P_STEP_STT]]
        sv, stv = self.cells[:, kn.CH_STEP_SV], self.cells[:, kn.CH_STEP_STV]
        det = s1 * stt - st * st
        slope = (s1 * stv - st * sv) / det if det > 1e-12 * s1 * s1 else np.zeros_like(sv)
        return (sv - slope * st) / s1 + slope * (at - self.pack[kn.P_STEP_TREF]), slope

    def level(self, row: int, t: FloatArray, volts: FloatArray, mask: BoolArray,
              level_s: float) -> None:
        offset = t[row] - self.pack[kn.P_STEP_TE]
        if self.pack[kn.P_STEP_LEVEL_N] >= 1.0 and offset > level_s:
            return
        self.pack[kn.P_STEP_LEVEL_N] += 1.0
        self.pack[kn.P_STEP_LEVEL_T] += offset
        self.cells[:, kn.CH_STEP_LEVEL] += np.where(mask[row], volts[row], np.nan)

    def reref(self, origin: float) -> None:
        shift = origin - self.pack[kn.P_STEP_TREF]
        s1, st = self.pack[kn.P_STEP_S1], self.pack[kn.P_STEP_ST]
        self.pack[kn.P_STEP_STT] += -2.0 * shift * st + shift * shift * s1
        self.pack[kn.P_STEP_ST] = st - shift * s1
        self.pack[kn.P_STEP_TREF] = origin
        self.cells[:, kn.CH_STEP_STV] -= shift * self.cells[:, kn.CH_STEP_SV]


def dcir_steps(t: FloatArray, current_a: FloatArray, volts: FloatArray, mask: BoolArray,
               temps: FloatArray, soc: FloatArray, cells: FloatArray, pack: FloatArray,
               min_step_a: float, max_dt_s: float, pre_tau_s: float, post_min_s: float,
               post_max_s: float, level_s: float, r0_max_ohm: float,
               ) -> tuple[IntArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    window = _Window(cells, pack)
    rows: list[int] = []
    deltas: list[float] = []
    estimates: list[FloatArray] = []
    step_temps: list[FloatArray] = []
    step_soc: list[float] = []
    tolerance = kn.STEP_STEADY_FRACTION * min_step_a

    def evaluate(row: int) -> None:
        pack[kn.P_STEP_PHASE] = 0.0
        te = pack[kn.P_STEP_TE]
        delta_i = pack[kn.P_STEP_SI] / pack[kn.P_STEP_S1] - pack[kn.P_STEP_IPRE]
        level_n = pack[kn.P_STEP_LEVEL_N]
        if level_n < 1.0 or abs(delta_i) < min_step_a:
            return
        _, slope = window.line(te)
        level_t = te + pack[kn.P_STEP_LEVEL_T] / level_n
        vpost = cells[:, kn.CH_STEP_LEVEL] / level_n - slope * (level_t - te)
        with np.errstate(invalid="ignore"):
            r = (cells[:, kn.CH_STEP_VPRE] - vpost) / delta_i
            keep = (cells[:, kn.CH_STEP_TAINT] < 0.5) & (r > 0.0) & (r < r0_max_ohm)
        if keep.any():
            rows.append(row)
            deltas.append(delta_i)
            estimates.append(np.where(keep, r, np.nan))
            step_temps.append(cells[:, kn.CH_STEP_TEMP].copy())
            step_soc.append(float(pack[kn.P_STEP_SOC]))

    for row in range(1, t.shape[0]):
        dt, i = t[row] - t[row - 1], current_a[row]
        if (not (np.isfinite(i) and 0.0 < dt <= max_dt_s and min_step_a > 0.0)
                or pack[kn.P_STEP_N] < 1.0):
            window.restart(row, t, current_a, volts, mask)
            continue
        mean = pack[kn.P_STEP_SI] / pack[kn.P_STEP_S1]
        if pack[kn.P_STEP_PHASE] > 0.5:
            if abs(i - mean) <= tolerance:
                window.add(row, t, current_a, volts, mask, 1.0)
                window.level(row, t, volts, mask, level_s)
                if (t[row] - pack[kn.P_STEP_TE] >= post_max_s
                        and pack[kn.P_STEP_N] >= kn.STEP_MIN_POST):
                    evaluate(row)
                continue
            if (t[row - 1] - pack[kn.P_STEP_TE] >= post_min_s
                    and pack[kn.P_STEP_N] >= kn.STEP_MIN_POST):
                evaluate(row - 1)
                mean = pack[kn.P_STEP_SI] / pack[kn.P_STEP_S1]
            else:
                window.restart(row, t, current_a, volts, mask)
                continue
        if abs(i - mean) >= min_step_a and pack[kn.P_STEP_N] >= kn.STEP_MIN_PRE:
            te = 0.5 * (t[row - 1] + t[row])
            vpre, _ = window.line(te)
            cells[:, kn.CH_STEP_VPRE] = np.where(cells[:, kn.CH_STEP_TAINT] < 0.5, vpre, np.nan)
            cells[:, kn.CH_STEP_LEVEL] = 0.0
            cells[:, kn.CH_STEP_TEMP] = temps[row]
            pack[kn.P_STEP_SOC] = soc[row]
            window.restart(row, t, current_a, volts, mask)
            pack[[kn.P_STEP_PHASE, kn.P_STEP_TE, kn.P_STEP_IPRE, kn.P_STEP_LEVEL_N,
                  kn.P_STEP_LEVEL_T]] = (1.0, te, mean, 0.0, 0.0)
            window.level(row, t, volts, mask, level_s)
        elif abs(i - mean) > tolerance:
            window.restart(row, t, current_a, volts, mask)
        else:
            if t[row] - pack[kn.P_STEP_TREF] > 60.0:
                window.reref(t[row])
            memory = max(pre_tau_s, kn.STEP_MIN_PRE * dt)
            window.add(row, t, current_a, volts, mask, float(np.exp(-dt / memory)))
    c = volts.shape[1]
    return (np.array(rows, dtype=np.int64), np.array(deltas, dtype=np.float64),
            np.array(estimates, dtype=np.float64).reshape(-1, c),
            np.array(step_temps, dtype=np.float64).reshape(-1, c),
            np.array(step_soc, dtype=np.float64))


def rls_update(t: FloatArray, current_a: FloatArray, volts: FloatArray, mask: BoolArray,
               rest_s: FloatArray, cells: FloatArray, pack: FloatArray, tau_s: float,
               memory_s: float, max_gap_s: float) -> None:
    p = pack[kn.P_RLS_P:kn.P_RLS_P + 9].reshape(3, 3).copy()
    theta = cells[:, [kn.CH_RLS_R0, kn.CH_RLS_R1, kn.CH_RLS_KAPPA]]
    e2 = cells[:, kn.CH_RLS_E2].copy()
    last = cells[:, kn.CH_RLS_LAST_V].copy()
    for row in range(1, t.shape[0]):
        dt, i0, i1 = t[row] - t[row - 1], current_a[row - 1], current_a[row]
        now = np.where(mask[row], volts[row], np.nan)
        if not (0.0 < dt <= max_gap_s and np.isfinite(i0) and np.isfinite(i1)):
            last = now
            pack[kn.P_RLS_X] = i1 if np.isfinite(i1) else 0.0
            continue
        a = np.exp(-dt / tau_s)
        x_old = pack[kn.P_RLS_X]
        x_new = a * x_old + (1.0 - a) * i0
        pack[kn.P_RLS_X] = x_new
        if rest_s[row] < 0.0:
            phi = np.array([-(i1 - i0), -(x_new - x_old), -0.5 * (i0 + i1) * dt])
            forget = np.exp(-dt / memory_s) if np.trace(p) < kn.RLS_TRACE_MAX else 1.0
            p_phi = p @ phi
            gain = p_phi / (forget + phi @ p_phi)
            used = mask[row] & np.isfinite(last)
            error = (volts[row] - last) - theta @ phi
            theta[used] += np.outer(error[used], gain)
            square = error * error
            e2 = np.where(used, np.where(np.isnan(e2), square,
                                         e2 + kn._RLS_ERROR_SMOOTHING * (square - e2)), e2)
            p = (p - np.outer(gain, p_phi)) / forget
            p = np.triu(p) + np.triu(p, 1).T
            p = 0.5 * (p + p.T)
        last = now
    cells[:, [kn.CH_RLS_R0, kn.CH_RLS_R1, kn.CH_RLS_KAPPA]] = theta
    cells[:, kn.CH_RLS_E2] = e2
    cells[:, kn.CH_RLS_LAST_V] = last
    pack[kn.P_RLS_P:kn.P_RLS_P + 9] = p.reshape(9)


def ring_push(ring_r: npt.NDArray[np.float32], ring_t: npt.NDArray[np.float32],
              steps: IntArray, r0: FloatArray, temps: FloatArray) -> None:
    window = ring_r.shape[1]
    for estimates, temperatures in zip(r0, temps, strict=True):
        have = np.isfinite(estimates)
        slot = steps[have] % window
        ring_r[have, slot] = estimates[have].astype(np.float32)
        ring_t[have, slot] = temperatures[have].astype(np.float32)
        steps[have] += 1


def r0_at_25c(ring_r: npt.NDArray[np.float32], ring_t: npt.NDArray[np.float32],
              steps: IntArray, b_k: float) -> tuple[FloatArray, FloatArray]:
    c, window = ring_r.shape
    median = np.full(c, np.nan)
    sigma = np.full(c, np.nan)
    for j in range(c):
        held = int(min(steps[j], window))
        if not held:
            continue
        temps = ring_t[j, :held].astype(np.float64)
        factor = np.where(np.isfinite(temps),
                          np.exp(b_k * (1.0 / (temps + 273.15) - 1.0 / kn.T_REF_K)), 1.0)
        values = ring_r[j, :held].astype(np.float64) / factor
        median[j] = np.median(values)
        if held >= 2:
            sigma[j] = 1.4826 * np.median(np.abs(values - median[j])) * 1.2533 / np.sqrt(held)
    return median, sigma


def arrhenius_fit(ln_r: FloatArray, inv_t: FloatArray, held: IntArray,
                  soc_bin: IntArray, soc_bins: int, min_held: int,
                  min_span_k: float) -> tuple[float, float]:
    counts = np.minimum(held, ln_r.shape[1])
    used = counts >= min_held
    x = np.array([np.median(inv_t[b, :h]) for b, h in enumerate(counts) if used[b]])
    y = np.array([np.median(ln_r[b, :h]) for b, h in enumerate(counts) if used[b]])
    group = soc_bin[used]
    # Centre each SOC bin's points on their own mean (the fixed effect); bins with one point
    # carry no information about the slope.
    keep = np.zeros(x.size, np.bool_)
    dx = np.zeros(x.size)
    dy = np.zeros(x.size)
    groups = 0
    for s in range(soc_bins):
        members = group == s
        if members.sum() < 2:
            continue
        groups += 1
        keep |= members
        dx[members] = x[members] - x[members].mean()
        dy[members] = y[members] - y[members].mean()
    if not groups:
        return np.nan, np.nan
    sxx = float(np.sum(dx[keep] ** 2))
    temps = 1.0 / x[keep]
    if temps.max() - temps.min() < min_span_k or sxx <= 0.0:
        return np.nan, np.nan
    slope = float(np.sum(dx[keep] * dy[keep])) / sxx
    dof = int(keep.sum()) - groups - 1
    if dof <= 0:
        return slope, np.nan
    residual = float(np.sum((dy[keep] - slope * dx[keep]) ** 2))
    return slope, float(np.sqrt(residual / dof / sxx))


def awtls_update(c: FloatArray, x: FloatArray, y: FloatArray, var_x: FloatArray,
                 var_y: FloatArray, gamma: float,
                 update: BoolArray) -> tuple[FloatArray, FloatArray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        add = (update & (var_x > 0.0) & (var_y > 0.0) & np.isfinite(x) & np.isfinite(y))
        k = np.sqrt(var_x / var_y)
        pairs = np.stack([x * x / var_y / (k * k), x * y / var_y / k, y * y / var_y,
                          x * x / var_x, x * y * k / var_x, y * y * k * k / var_x], axis=1)
    c[add, :6] = gamma * c[add, :6] + pairs[add]
    c[add, 6] = k[add]
    q = np.full(c.shape[0], np.nan)
    var_q = np.full(c.shape[0], np.nan)
    for i, (c1, c2, c3, c4, c5, c6, ki) in enumerate(c):
        if not (ki > 0.0 and c5 > 0.0):
            continue
        roots = np.roots([c5, -c1 + 2 * c4 - c6, 3 * c2 - 3 * c5, c1 - 2 * c3 + c6, -c2])
        real = roots[np.abs(roots.imag) <= 1e-7 * (1.0 + np.abs(roots.real))].real
        real = real[real > 0.0]
        if not real.size:
            continue
        cost = (c4 * real**4 - 2 * c5 * real**3 + (c1 + c6) * real**2 - 2 * c2 * real + c3) / (
            real**2 + 1) ** 2
        r = real[np.argmin(cost)]
        # J = N·D with D = (r² + 1)⁻²; J″ = N″D + 2N′D′ + ND″
        n0 = c4 * r**4 - 2 * c5 * r**3 + (c1 + c6) * r**2 - 2 * c2 * r + c3
        n1 = 4 * c4 * r**3 - 6 * c5 * r**2 + 2 * (c1 + c6) * r - 2 * c2
        n2 = 12 * c4 * r**2 - 12 * c5 * r + 2 * (c1 + c6)
        u = r * r + 1.0
        curvature = n2 / u**2 - 8.0 * r * n1 / u**3 + n0 * (24.0 * r * r / u**4 - 4.0 / u**3)
        q[i] = r / ki
        if curvature > 0.0:
            var_q[i] = 2.0 / curvature / (ki * ki)
    return q, var_q


def passport_counters(t: FloatArray, current_a: FloatArray, temps: FloatArray,
                      temp_mask: BoolArray, soc_pack: FloatArray, counters: FloatArray,
                      high_c: float, low_c: float, charging_a: float, max_gap_s: float) -> None:
    if t.shape[0] < 2:
        return
    dt = np.diff(t)
    counted = (dt > 0.0) & (dt <= max_gap_s)
    valid = temp_mask[1:]
    has = valid.any(axis=1) & counted
    with np.errstate(invalid="ignore", divide="ignore"):
        hottest = np.where(valid, temps[1:], -np.inf).max(axis=1, initial=-np.inf)
        coldest = np.where(valid, temps[1:], np.inf).min(axis=1, initial=np.inf)
        mean = np.where(valid, temps[1:], 0.0).sum(axis=1) / valid.sum(axis=1)
    charging = current_a[1:] < -charging_a
    hot = has & (hottest >= high_c)
    cold = has & (coldest <= low_c)
    counters[kn.C_TIME_HIGH] += dt[hot].sum()
    counters[kn.C_TIME_HIGH_CHARGING] += dt[hot & charging].sum()
    counters[kn.C_TIME_LOW] += dt[cold].sum()
    counters[kn.C_TIME_LOW_CHARGING] += dt[cold & charging].sum()
    temp_bin = np.clip(np.floor((mean - kn.TEMP_HIST_LO_C) / kn.TEMP_HIST_STEP_C) + 1.0, 0,
                       kn.TEMP_BINS - 1)
    for row in np.flatnonzero(has):
        counters[kn.C_TEMP_HIST + int(temp_bin[row])] += dt[row]
    soc = soc_pack[1:]
    known = counted & np.isfinite(soc)
    with np.errstate(invalid="ignore"):
        decile = np.clip(np.floor(soc * kn.SOC_BINS), 0, kn.SOC_BINS - 1)
    for row in np.flatnonzero(known):
        counters[kn.C_SOC_HIST + int(decile[row])] += dt[row]


def robust_z(values: FloatArray, valid: BoolArray) -> tuple[FloatArray, float, float]:
    ok = valid & np.isfinite(values)
    z = np.full(values.shape, np.nan)
    if ok.sum() < 3:
        return z, np.nan, np.nan
    median = float(np.median(values[ok]))
    scale = 1.4826 * float(np.median(np.abs(values[ok] - median)))
    if scale > 0.0:
        z[ok] = (values[ok] - median) / scale
    return z, median, scale
