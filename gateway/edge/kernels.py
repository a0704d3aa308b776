"""numba kernels of the edge core: small, composable functions over sample matrices.

Shapes: ``n`` consecutive samples of one pack are rows; cells (or temperature sensors) are
columns. ``t`` is POSIX seconds, strictly increasing; current is positive while discharging.
Every kernel is compiled ``nopython`` with the GIL released (it runs beside the I/O threads) and
cached on disk (``NUMBA_CACHE_DIR`` comes from the environment: systemd sets it), and each has a
plain-NumPy twin with the same signature in :mod:`gateway.edge.reference` that the property tests
compare it against.

Kernels that carry estimator state across batches take that state as arrays and update them in
place, so the caller can split a batch anywhere and get the same result as one call.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

from gateway.model import BoolArray, FloatArray

IntArray = npt.NDArray[np.int64]

#: Columns of the throughput matrix returned by :func:`integrate_throughput`.
AH_CHARGE, AH_DISCHARGE, AH_TOTAL, WH_CHARGE, WH_DISCHARGE, WH_TOTAL = range(6)
THROUGHPUT_COLUMNS = 6

#: Columns of the statistics matrix returned by :func:`masked_stats`.
STAT_MIN, STAT_MAX, STAT_MEAN, STAT_SPREAD = range(4)

#: Columns of the event matrix returned by :func:`debounce`.
EVENT_ROW, EVENT_CHANNEL, EVENT_OLD, EVENT_NEW = range(4)

_SECONDS_PER_HOUR = 3600.0


@njit(cache=True, nogil=True)
def mask_plausible(values: FloatArray, valid: BoolArray, lo: float,
                   hi: float) -> tuple[BoolArray, int]:
    """The effective validity mask: the BMS's flag, and the value finite and within [lo, hi].

    Returns the mask and how many values the BMS flagged valid but were implausible (NaN or out
    of range): those are counted, and never reach an estimator.
    """
    n, c = values.shape
    mask = np.empty((n, c), np.bool_)
    implausible = 0
    for i in range(n):
        for j in range(c):
            v = values[i, j]
            ok = valid[i, j] and lo <= v <= hi  # NaN fails both comparisons
            mask[i, j] = ok
            if valid[i, j] and not ok:
                implausible += 1
    return mask, implausible


@njit(cache=True, nogil=True)
def masked_stats(values: FloatArray, mask: BoolArray) -> tuple[FloatArray, IntArray]:
    """Per row: min, max, mean and spread (max − min) over the masked-in columns, and their count.

    A row with no valid column gets NaN statistics and a count of 0.
    """
    n, c = values.shape
    stats = np.full((n, 4), np.nan)
    counts = np.zeros(n, np.int64)
    for i in range(n):
        lo = np.inf
        hi = -np.inf
        total = 0.0
        k = 0
        for j in range(c):
            if mask[i, j]:
                v = values[i, j]
                lo = min(lo, v)
                hi = max(hi, v)
                total += v
                k += 1
        if k > 0:
            stats[i, STAT_MIN] = lo
            stats[i, STAT_MAX] = hi
            stats[i, STAT_MEAN] = total / k
            stats[i, STAT_SPREAD] = hi - lo
            counts[i] = k
    return stats, counts


@njit(cache=True, nogil=True)
def _positive_area(a: float, b: float, dt: float) -> float:
    """∫ max(x, 0) over an interval of length dt where x runs linearly from a to b.

    Splitting at the zero crossing keeps charge and discharge apart when the current changes
    sign between two samples, so charge + discharge is exactly the |I| integral.
    """
    if a >= 0.0 and b >= 0.0:
        return 0.5 * dt * (a + b)
    if a <= 0.0 and b <= 0.0:
        return 0.0
    if a > 0.0:
        return 0.5 * dt * a * a / (a - b)
    return 0.5 * dt * b * b / (b - a)


@njit(cache=True, nogil=True)
def integrate_throughput(t: FloatArray, current_a: FloatArray, pack_voltage_v: FloatArray,
                         totals: FloatArray, max_gap_s: float) -> FloatArray:
    """Running charge (Ah) and energy (Wh) throughput, trapezoidal over consecutive samples.

    Row k of the result is ``totals`` plus everything integrated up to sample k (row 0 is
    ``totals``), columns as ``AH_CHARGE`` … ``WH_TOTAL``. Discharge is positive current (power),
    charge negative; the totals are ∫|I| and ∫|P|. An interval is skipped when it is longer than
    ``max_gap_s`` or not positive (the data in between is missing, not zero), when either end's
    current is not finite (Ah and Wh), or when either end's pack voltage is not finite (Wh only).
    """
    n = t.shape[0]
    out = np.empty((n, THROUGHPUT_COLUMNS))
    acc = totals.copy()
    if n > 0:
        out[0] = acc
    for k in range(1, n):
        dt = t[k] - t[k - 1]
        i0 = current_a[k - 1]
        i1 = current_a[k]
        if dt > 0.0 and dt <= max_gap_s and np.isfinite(i0) and np.isfinite(i1):
            discharge = _positive_area(i0, i1, dt)
            charge = _positive_area(-i0, -i1, dt)
            acc[AH_CHARGE] += charge / _SECONDS_PER_HOUR
            acc[AH_DISCHARGE] += discharge / _SECONDS_PER_HOUR
            acc[AH_TOTAL] += (charge + discharge) / _SECONDS_PER_HOUR
            p0 = pack_voltage_v[k - 1] * i0
            p1 = pack_voltage_v[k] * i1
            if np.isfinite(p0) and np.isfinite(p1):
                discharge = _positive_area(p0, p1, dt)
                charge = _positive_area(-p0, -p1, dt)
                acc[WH_CHARGE] += charge / _SECONDS_PER_HOUR
                acc[WH_DISCHARGE] += discharge / _SECONDS_PER_HOUR
                acc[WH_TOTAL] += (charge + discharge) / _SECONDS_PER_HOUR
        out[k] = acc
    return out


@njit(cache=True, nogil=True)
def r0_steps(t: FloatArray, current_a: FloatArray, cell_voltages_v: FloatArray,
             mask: BoolArray, min_step_a: float, max_step_dt_s: float,
             ring: FloatArray, cell_steps: IntArray) -> int:
    """Internal resistance from current steps between consecutive samples; updates state in place.

    A step is |ΔI| ≥ ``min_step_a`` (and ΔI ≠ 0) within ``max_step_dt_s``. For every cell valid
    on both sides, R0 = −ΔV/ΔI (discharge current is positive, so the voltage drops when the
    current rises) goes into that cell's ring of the last ``ring.shape[1]`` estimates, at position
    ``cell_steps[j] % window``, and ``cell_steps[j]`` counts it. Returns how many steps gave at
    least one cell an estimate.
    """
    n, c = cell_voltages_v.shape
    window = ring.shape[1]
    accepted = 0
    for k in range(1, n):
        dt = t[k] - t[k - 1]
        if not (dt > 0.0 and dt <= max_step_dt_s):
            continue
        di = current_a[k] - current_a[k - 1]
        if not abs(di) >= min_step_a or di == 0.0:  # NaN current fails the comparison
            continue
        used = False
        for j in range(c):
            if mask[k - 1, j] and mask[k, j]:
                r = -(cell_voltages_v[k, j] - cell_voltages_v[k - 1, j]) / di
                if np.isfinite(r):
                    ring[j, cell_steps[j] % window] = r
                    cell_steps[j] += 1
                    used = True
        if used:
            accepted += 1
    return accepted


@njit(cache=True, nogil=True)
def ring_median(ring: FloatArray, cell_steps: IntArray) -> FloatArray:
    """Per cell, the median of the estimates held in its ring (NaN while it holds none)."""
    c, window = ring.shape
    out = np.full(c, np.nan)
    for j in range(c):
        held = min(cell_steps[j], window)
        if held == 0:
            continue
        ordered = np.sort(ring[j, :held])
        mid = held // 2
        if held % 2 == 1:
            out[j] = ordered[mid]
        else:
            out[j] = 0.5 * (ordered[mid - 1] + ordered[mid])
    return out


@njit(cache=True, nogil=True)
def interval_ticks(t: FloatArray, origin: float, interval_s: float,
                   last_tick: float) -> tuple[BoolArray, float]:
    """Which samples start a new reporting interval of measurement time.

    Interval buckets are ``floor((t − origin) / interval_s)``; a sample is a tick when its bucket
    is after the bucket of ``last_tick`` (the time of the previous tick; −inf: none yet), so ticks
    stay on a fixed grid however the samples jitter, and a changed interval applies at once. With
    ``interval_s`` = 0 every sample is a tick. Returns the ticks and the time of the last one.
    """
    n = t.shape[0]
    ticks = np.zeros(n, np.bool_)
    last_bucket = np.floor((last_tick - origin) / interval_s) if interval_s > 0.0 else last_tick
    for k in range(n):
        bucket = np.floor((t[k] - origin) / interval_s) if interval_s > 0.0 else t[k]
        if bucket > last_bucket:
            ticks[k] = True
            last_bucket = bucket
            last_tick = t[k]
    return ticks, last_tick


@njit(cache=True, nogil=True)
def debounce(t: FloatArray, values: IntArray, reported: IntArray, candidate: IntArray,
             since: FloatArray, hold_s: float) -> tuple[IntArray, FloatArray]:
    """Report a channel's change only once the new value has held for ``hold_s``; state in place.

    Per channel (column): ``reported`` is the last reported value; a different value becomes the
    ``candidate`` from ``since`` (NaN: no candidate). A candidate that is replaced by another
    value, or falls back to the reported one, before ``hold_s`` has passed is never reported.
    Returns the confirmed changes as rows ``(row, channel, old, new)`` in row-then-channel order,
    and the time each change began.
    """
    n, c = values.shape
    capacity = 16
    events = np.empty((capacity, 4), np.int64)
    onsets = np.empty(capacity)
    found = 0
    for i in range(n):
        for j in range(c):
            x = values[i, j]
            if x == reported[j]:
                since[j] = np.nan
                continue
            if np.isnan(since[j]) or x != candidate[j]:
                candidate[j] = x
                since[j] = t[i]
            if t[i] - since[j] >= hold_s:
                if found == capacity:
                    capacity *= 2
                    grown = np.empty((capacity, 4), np.int64)
                    grown[:found] = events
                    events = grown
                    grown_onsets = np.empty(capacity)
                    grown_onsets[:found] = onsets
                    onsets = grown_onsets
                events[found, EVENT_ROW] = i
                events[found, EVENT_CHANNEL] = j
                events[found, EVENT_OLD] = reported[j]
                events[found, EVENT_NEW] = x
                onsets[found] = since[j]
                found += 1
                reported[j] = x
                since[j] = np.nan
    return events[:found].copy(), onsets[:found].copy()
