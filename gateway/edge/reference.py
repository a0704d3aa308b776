"""Plain-NumPy twins of the numba kernels in :mod:`gateway.edge.kernels`.

Each function has the same name, signature, result and in-place state updates as its kernel,
written the obvious NumPy way rather than the fast way. The property tests run both on generated
inputs and require them to agree; the benchmark measures what compiling buys. The daemon never
calls these.
"""

from __future__ import annotations

import numpy as np

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


def r0_steps(t: FloatArray, current_a: FloatArray, cell_voltages_v: FloatArray,
             mask: BoolArray, min_step_a: float, max_step_dt_s: float,
             ring: FloatArray, cell_steps: IntArray) -> int:
    n, c = cell_voltages_v.shape
    window = ring.shape[1]
    if n < 2:
        return 0
    dt = np.diff(t)
    di = np.diff(current_a)
    with np.errstate(divide="ignore", invalid="ignore"):
        step = (dt > 0.0) & (dt <= max_step_dt_s) & (np.abs(di) >= min_step_a) & (di != 0.0)
        r0 = -(cell_voltages_v[1:] - cell_voltages_v[:-1]) / di[:, None]
    used = mask[:-1] & mask[1:] & step[:, None] & np.isfinite(r0)
    for j in range(c):
        estimates = r0[used[:, j], j][-window:]
        skipped = int(np.count_nonzero(used[:, j])) - estimates.size
        positions = (cell_steps[j] + skipped + np.arange(estimates.size)) % window
        ring[j, positions] = estimates
        cell_steps[j] += estimates.size + skipped
    return int(np.count_nonzero(used.any(axis=1)))


def ring_median(ring: FloatArray, cell_steps: IntArray) -> FloatArray:
    c, window = ring.shape
    out = np.full(c, np.nan)
    for j in range(c):
        held = min(int(cell_steps[j]), window)
        if held:
            out[j] = np.median(ring[j, :held])
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
