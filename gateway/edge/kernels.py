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
_KELVIN = 273.15
#: 25 °C, the reference temperature of every normalised resistance
T_REF_K = 298.15

# ---------------------------------------------------------------------------------------------
# Estimator state layouts. The kernels keep per-pack scalars in one float vector (``pack``) and
# per-cell values in one matrix (``cells``, a row per cell), so the state is a handful of arrays:
# cheap to pass, and few entries in the checkpoint archive. The names below index them.

#: ``pack`` vector: conditioning (current offset, rest detection)
P_LAST_I_CORR = 0  # the previous sample's offset-corrected current (A)
P_OFFSET_A = 1  # zero-current offset of the current sensor (A), subtracted from every sample
P_REST_SINCE = 2  # measurement time the present rest began (NaN: not at rest)
P_REST_SUM = 3  # Σ current over the settled part of the present rest (A)
P_REST_N = 4  # samples in that sum
#: ``pack`` vector: SOC and OCV points
P_ANCHOR_AH = 5  # ∫I dt since the last OCV point (Ah, + discharge)
P_ANCHOR_ABS_AH = 6  # ∫|I| dt since the last OCV point (Ah)
P_ANCHOR_TS = 7  # time of the last OCV point (NaN: none yet)
P_ANCHOR_OK = 8  # 1 while every interval since the last OCV point was integrated (no gap)
P_RELAXED = 9  # 1 while the present rest is long enough for the voltage to be the OCV
P_NEXT_POINT_S = 10  # rest duration at which the next OCV point within this rest is due
#: ``pack`` vector: current-step (DC-IR) detector
P_STEP_PHASE = 11  # 0: collecting the pre-step window; 1: collecting the post-step window
P_STEP_TREF = 12  # time origin of the window sums
P_STEP_S1 = 13  # Σw, Σw·t, Σw·t², Σw·I over the window (w: discount weights)
P_STEP_ST = 14
P_STEP_STT = 15
P_STEP_SI = 16
P_STEP_N = 17  # samples in the window
P_STEP_TE = 18  # the step instant (midpoint of the two samples around the step)
P_STEP_IPRE = 19  # the pre-step current (A)
P_STEP_LEVEL_N = 20  # samples in the post-step level (the first samples after the step)
P_STEP_LEVEL_T = 21  # Σ t − te over them
#: ``pack`` vector: recursive least squares on the 1-RC model (shared covariance)
P_RLS_X = 22  # the current through the RC branch's filter, x_k (A)
P_RLS_P = 23  # 3 × 3 covariance, row-major, 9 entries
#: ``pack`` vector: bookkeeping of the edge core
P_TREND_STEPS = 32  # the step count at the last point of the resistance trend
P_STEP_SOC = 33  # the pack's mean cell SOC at the pending step
PACK_SLOTS = 36

#: ``cells`` matrix columns
CH_STUCK_REF = 0  # the pack's mean cell voltage when this cell's reading last changed (V)
CH_SOC = 1  # state of charge (0..1), coulomb counted between OCV resets
CH_VREST = 2  # the cell voltage smoothed over the present rest (V; NaN: none yet)
CH_STEP_SV = 3  # Σw·v and Σw·t·v over the step window
CH_STEP_STV = 4
CH_STEP_VPRE = 5  # the pre-step voltage extrapolated to the step instant (V)
CH_STEP_LEVEL = 6  # Σ v over the post-step level samples
CH_STEP_TAINT = 7  # 1: the cell was invalid somewhere in the window
CH_RLS_R0 = 8  # θ = (R0, R1, κ): ohmic and RC resistance (Ω), dOCV/dQ (V/(A·s))
CH_RLS_R1 = 9
CH_RLS_KAPPA = 10
CH_RLS_E2 = 11  # smoothed squared prediction error (V²)
CH_RLS_LAST_V = 12  # the previous aligned cell voltage (V; NaN: none or invalid)
CH_STEP_TEMP = 13  # the cell's temperature at the pending step (°C)
CELL_SLOTS = 14

#: ``counters`` vector: lifetime time counters (s) and event counts, never decreasing
C_TIME_HIGH = 0  # time with the hottest sensor at or above the high limit
C_TIME_LOW = 1  # time with the coldest sensor at or below the low limit
C_TIME_HIGH_CHARGING = 2  # the same while charging
C_TIME_LOW_CHARGING = 3
C_DEEP_DISCHARGE = 4  # debounced deep-discharge events
C_OVERCHARGE = 5  # debounced overcharge events
C_SOC_HIST = 6  # time per SOC decile (10 bins: 0–10 %, …, 90–100 %)
SOC_BINS = 10
C_TEMP_HIST = C_SOC_HIST + SOC_BINS  # time per pack-mean temperature bin (below, 5 K bins, above)
TEMP_HIST_LO_C = -20.0
TEMP_HIST_STEP_C = 5.0
TEMP_BINS = 18  # below −20 °C, 16 bins of 5 K up to 60 °C, at or above 60 °C
COUNTER_SLOTS = C_TEMP_HIST + TEMP_BINS

#: OCV point statistics columns returned by :func:`soc_track`
PT_AH, PT_ABS_AH, PT_SECONDS, PT_OK = range(4)

#: AWTLS sums per estimator (rows of the ``awtls`` matrix): Plett's c1 … c6, and the ratio
#: K = σx/σy of the latest update that scales them
AWTLS_SLOTS = 7

#: A window sample whose current differs from the window's mean by more than this fraction of
#: the step threshold breaks the window: the current is not steady, so no step starts from it.
STEP_STEADY_FRACTION = 0.25
#: Samples a window needs before and after a step.
STEP_MIN_PRE = 3
STEP_MIN_POST = 3
#: Window sums are re-referenced to a new time origin once it is this old (precision).
_STEP_REREF_S = 60.0
#: The smoothing of the squared RLS prediction error (per update).
_RLS_ERROR_SMOOTHING = 0.01
#: Initial RLS covariance: σ of 100 mΩ on R0 and R1, 1e-5 V/(A·s) on κ; the trace is capped at
#: ten times its initial value so that forgetting without excitation cannot wind it up.
RLS_P0_R = 1e-2
RLS_P0_KAPPA = 1e-10
RLS_TRACE_MAX = 10.0 * (2 * RLS_P0_R + RLS_P0_KAPPA)


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


# ---------------------------------------------------------------------------------------------
# Conditioning


@njit(cache=True, nogil=True)
def mask_jumps_and_stuck(volts: FloatArray, mask: BoolArray, stuck_ref: FloatArray,
                         stuck_dv: float, jump_v: float) -> tuple[BoolArray, int, int]:
    """Mask cell readings that jump alone or are stuck; ``stuck_ref`` is updated in place.

    Row 0 is the previous sample (its mask already final). A reading is a *jump* when its change
    since the previous valid reading differs from the pack's mean change by more than ``jump_v``:
    a current step moves every cell together, a bad reading moves one. A reading is *stuck* when it
    is exactly the previous one while the pack's mean cell voltage has moved more than
    ``stuck_dv`` since the reading last changed (a cell at rest, whose pack does not move, is never
    called stuck). Returns the mask of rows 1.., and how many readings were stuck and jumped.
    """
    n, c = volts.shape
    out = np.empty((max(n - 1, 0), c), np.bool_)
    jump = np.empty(c, np.bool_)
    stuck = 0
    jumped = 0
    for k in range(1, n):
        delta_total = 0.0
        delta_count = 0
        for j in range(c):
            if mask[k, j] and mask[k - 1, j]:
                delta_total += volts[k, j] - volts[k - 1, j]
                delta_count += 1
        mean_delta = delta_total / delta_count if delta_count else 0.0
        total = 0.0
        count = 0
        for j in range(c):
            jump[j] = (mask[k, j] and mask[k - 1, j]
                       and abs(volts[k, j] - volts[k - 1, j] - mean_delta) > jump_v)
            if mask[k, j] and not jump[j]:
                total += volts[k, j]
                count += 1
        mean = total / count if count else np.nan  # of the readings that did not jump
        for j in range(c):
            ok = mask[k, j]
            if jump[j]:
                ok = False
                jumped += 1
            elif ok:
                if volts[k, j] == volts[k - 1, j]:
                    if np.isnan(stuck_ref[j]):
                        stuck_ref[j] = mean
                    elif abs(mean - stuck_ref[j]) > stuck_dv:
                        ok = False
                        stuck += 1
                else:
                    stuck_ref[j] = mean
            out[k - 1, j] = ok
            # The next row compares with this one: a masked reading is no reference.
            mask[k, j] = ok
    return out, stuck, jumped


@njit(cache=True, nogil=True)
def condition_current(t: FloatArray, current_a: FloatArray, rest_band_a: float,
                      rest_settle_s: float, max_gap_s: float,
                      pack: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Offset-corrected current and time at rest per row; the conditioning state in place.

    The pack *rests* while |I − offset| ≤ ``rest_band_a``; a gap longer than ``max_gap_s`` or an
    unknown current ends a rest. Once a rest has lasted ``rest_settle_s``, the mean measured
    current over the rest so far is the sensor's zero offset (no current flows at rest), and it
    is subtracted from every later sample. Row 0 is the previous sample: its corrected current
    comes from the state. Returns the corrected current (every row) and, per row, seconds since
    the present rest began (−1: not at rest).
    """
    n = t.shape[0]
    corrected = np.empty(n)
    rest_s = np.full(n, -1.0)
    if n == 0:
        return corrected, rest_s
    corrected[0] = pack[P_LAST_I_CORR]
    for k in range(1, n):
        i = current_a[k]
        if not np.isfinite(i):
            pack[P_REST_SINCE] = np.nan
            corrected[k] = np.nan
            continue
        dt = t[k] - t[k - 1]
        if abs(i - pack[P_OFFSET_A]) <= rest_band_a:
            if np.isnan(pack[P_REST_SINCE]) or not (0.0 < dt <= max_gap_s):
                pack[P_REST_SINCE] = t[k]
                pack[P_REST_SUM] = 0.0
                pack[P_REST_N] = 0.0
            rest_s[k] = t[k] - pack[P_REST_SINCE]
            if rest_s[k] >= rest_settle_s:
                pack[P_REST_SUM] += i
                pack[P_REST_N] += 1.0
                pack[P_OFFSET_A] = pack[P_REST_SUM] / pack[P_REST_N]
        else:
            pack[P_REST_SINCE] = np.nan
        corrected[k] = i - pack[P_OFFSET_A]
    pack[P_LAST_I_CORR] = corrected[n - 1]
    return corrected, rest_s


@njit(cache=True, nogil=True)
def align_cells(t: FloatArray, volts: FloatArray, mask: BoolArray,
                lag_s: float) -> tuple[FloatArray, BoolArray]:
    """Cell voltages brought to the instants their sample's current was measured.

    A BMS that samples the current ``lag_s`` before the cell voltages of the same cycle pairs
    each current with voltages taken later; the voltages are interpolated back to ``t − lag_s``
    between the previous and the present sample (at most one interval back), so voltage and
    current describe the same instant. Only the past is needed, so a batch split anywhere gives
    the same result. With ``lag_s`` = 0 the voltages are returned as they are. Row 0 is the
    previous sample; rows 1.. are returned.
    """
    n, c = volts.shape
    out = np.empty((max(n - 1, 0), c))
    valid = np.empty((max(n - 1, 0), c), np.bool_)
    for k in range(1, n):
        dt = t[k] - t[k - 1]
        back = 0.0
        if lag_s > 0.0 and dt > 0.0:
            back = min(lag_s / dt, 1.0)
        for j in range(c):
            if back == 0.0:
                out[k - 1, j] = volts[k, j]
                valid[k - 1, j] = mask[k, j]
            else:
                out[k - 1, j] = volts[k, j] - back * (volts[k, j] - volts[k - 1, j])
                valid[k - 1, j] = mask[k, j] and mask[k - 1, j]
    return out, valid


@njit(cache=True, nogil=True)
def cell_temperatures(temps: FloatArray, temp_mask: BoolArray,
                      sensor_of_cell: IntArray) -> FloatArray:
    """Per row, each cell's temperature: its sensor's reading, else the mean of the valid sensors.

    ``sensor_of_cell[j]`` is the sensor that measures cell j (see the edge core). NaN where no
    sensor of the row is valid.
    """
    n, s = temps.shape
    c = sensor_of_cell.shape[0]
    out = np.full((n, c), np.nan)
    for k in range(n):
        total = 0.0
        count = 0
        for q in range(s):
            if temp_mask[k, q]:
                total += temps[k, q]
                count += 1
        if count == 0:
            continue
        mean = total / count
        for j in range(c):
            q = sensor_of_cell[j]
            out[k, j] = temps[k, q] if 0 <= q < s and temp_mask[k, q] else mean
    return out


# ---------------------------------------------------------------------------------------------
# State of charge and OCV points


@njit(cache=True, nogil=True)
def _soc_from_ocv(volts: float, curve_soc: FloatArray, curve_v: FloatArray) -> float:
    return float(np.interp(volts, curve_v, curve_soc))


@njit(cache=True, nogil=True)
def soc_track(t: FloatArray, current_a: FloatArray, rest_s: FloatArray, volts: FloatArray,
              mask: BoolArray, curve_soc: FloatArray, curve_v: FloatArray,
              capacity_ah: FloatArray, cells: FloatArray, pack: FloatArray, ocv_rest_s: float,
              rest_tau_s: float, max_gap_s: float,
              ) -> tuple[FloatArray, IntArray, FloatArray, FloatArray, FloatArray]:
    """Coulomb-counted SOC per cell, reset from the relaxed OCV; OCV points for the capacity.

    ``current_a`` is offset-corrected, ``rest_s`` from :func:`condition_current`, ``volts`` and
    ``mask`` the aligned cells (rows 1.. used; row 0 is the previous sample). Per row:

    1. An *OCV point* is taken where a relaxed rest ends (at its last sample) and, within a long
       rest, every ``ocv_rest_s`` after it became relaxed: the cells' SOC (set from their OCV),
       their smoothed rest voltage, and the charge counted since the previous point (Ah, |Ah|,
       seconds, and whether every interval in between was integrated).
    2. The SOC of every cell falls by ∫I dt / capacity (trapezoid; gaps are not integrated and
       spoil the pending pair of points).
    3. At rest, the cell voltage is smoothed (time constant ``rest_tau_s``); once the rest has
       lasted ``ocv_rest_s`` the cell is relaxed and its SOC is read from the OCV curve.
    4. A cell without an SOC yet takes it from the OCV of its first valid voltage.

    The kernel returns right after an OCV point, before the row that follows it, so that the
    caller can update the capacities before counting goes on: the result does not depend on
    where batches end. Returns the SOC of the rows processed (1..; fewer than the input's when
    a point was taken), and per OCV point (none or one): its row, the cells' SOC, their rest
    voltages and the statistics (columns ``PT_AH`` … ``PT_OK``).
    """
    n, c = volts.shape
    soc_rows = np.empty((max(n - 1, 0), c))
    rows = np.empty(1, np.int64)
    point_soc = np.empty((1, c))
    point_v = np.empty((1, c))
    stats = np.empty((1, 4))
    found = 0
    processed = n - 1
    for k in range(1, n):
        dt = t[k] - t[k - 1]
        rs = rest_s[k]
        # 1. the end of a relaxed rest (a new rest restarted by a gap ends the old one too)
        due = pack[P_RELAXED] > 0.5 and rs <= 0.0
        if not due and pack[P_RELAXED] > 0.5 and rs >= pack[P_NEXT_POINT_S]:
            due = True
        if due:
            # The point is the state after the previous row, the last one of (this part of)
            # the rest.
            rows[found] = k - 1
            for j in range(c):
                point_soc[found, j] = cells[j, CH_SOC]
                point_v[found, j] = cells[j, CH_VREST]
            stats[found, PT_AH] = pack[P_ANCHOR_AH]
            stats[found, PT_ABS_AH] = pack[P_ANCHOR_ABS_AH]
            stats[found, PT_SECONDS] = t[k - 1] - pack[P_ANCHOR_TS]
            stats[found, PT_OK] = pack[P_ANCHOR_OK]
            found += 1
            pack[P_ANCHOR_AH] = 0.0
            pack[P_ANCHOR_ABS_AH] = 0.0
            pack[P_ANCHOR_TS] = t[k - 1]
            pack[P_ANCHOR_OK] = 1.0
            if rs <= 0.0:
                pack[P_RELAXED] = 0.0
            else:
                pack[P_NEXT_POINT_S] = rs + ocv_rest_s
            processed = k - 1
            break
        # 2. coulomb counting
        i0 = current_a[k - 1]
        i1 = current_a[k]
        if 0.0 < dt <= max_gap_s and np.isfinite(i0) and np.isfinite(i1):
            ah = 0.5 * (i0 + i1) * dt / _SECONDS_PER_HOUR
            for j in range(c):
                q = capacity_ah[j]
                if q > 0.0:
                    cells[j, CH_SOC] -= ah / q
            pack[P_ANCHOR_AH] += ah
            pack[P_ANCHOR_ABS_AH] += 0.5 * (abs(i0) + abs(i1)) * dt / _SECONDS_PER_HOUR
        elif np.isfinite(t[k - 1]):
            pack[P_ANCHOR_OK] = 0.0  # charge moved that nobody counted
        # 3. rest: smooth the voltage, read the SOC once relaxed
        if rs >= 0.0:
            alpha = 1.0 if rs == 0.0 else 1.0 - np.exp(-dt / rest_tau_s)
            for j in range(c):
                if rs == 0.0:
                    cells[j, CH_VREST] = np.nan
                if mask[k, j]:
                    v = volts[k, j]
                    previous = cells[j, CH_VREST]
                    cells[j, CH_VREST] = v if np.isnan(previous) else previous + alpha * (
                        v - previous)
            if rs >= ocv_rest_s:
                for j in range(c):
                    if np.isfinite(cells[j, CH_VREST]):
                        cells[j, CH_SOC] = _soc_from_ocv(cells[j, CH_VREST], curve_soc, curve_v)
                if pack[P_RELAXED] < 0.5:
                    pack[P_RELAXED] = 1.0
                    pack[P_NEXT_POINT_S] = rs + ocv_rest_s
        # 4. a first SOC from the first valid voltage
        for j in range(c):
            if np.isnan(cells[j, CH_SOC]) and mask[k, j]:
                cells[j, CH_SOC] = _soc_from_ocv(volts[k, j], curve_soc, curve_v)
            soc_rows[k - 1, j] = cells[j, CH_SOC]
    return (soc_rows[:processed].copy(), rows[:found].copy(), point_soc[:found].copy(),
            point_v[:found].copy(), stats[:found].copy())


@njit(cache=True, nogil=True)
def pack_soc(soc: FloatArray, capacity_ah: FloatArray) -> FloatArray:
    """The SOC of a series string per row: what it can still deliver over what it can hold.

    The weakest cell ends a discharge and the fullest ends a charge, so the string can deliver
    min(soc·Q) and take min((1 − soc)·Q); its SOC is the first over their sum. NaN where a cell
    has no SOC or capacity.
    """
    n, c = soc.shape
    out = np.full(n, np.nan)
    for k in range(n):
        out_ah = np.inf
        in_ah = np.inf
        ok = c > 0
        for j in range(c):
            s = soc[k, j]
            q = capacity_ah[j]
            if not (np.isfinite(s) and q > 0.0):
                ok = False
                break
            s = min(max(s, 0.0), 1.0)
            out_ah = min(out_ah, s * q)
            in_ah = min(in_ah, (1.0 - s) * q)
        if ok and out_ah + in_ah > 0.0:
            out[k] = out_ah / (out_ah + in_ah)
    return out


# ---------------------------------------------------------------------------------------------
# Internal resistance: DC-IR from current steps, and recursive least squares on a 1-RC model


@njit(cache=True, nogil=True)
def _step_restart(k: int, t: FloatArray, current_a: FloatArray, volts: FloatArray,
                  mask: BoolArray, cells: FloatArray, pack: FloatArray) -> None:
    """Start a fresh pre-step window holding row k alone (none if its current is unknown)."""
    c = cells.shape[0]
    pack[P_STEP_PHASE] = 0.0
    pack[P_STEP_TREF] = t[k]
    pack[P_STEP_S1] = 0.0
    pack[P_STEP_ST] = 0.0
    pack[P_STEP_STT] = 0.0
    pack[P_STEP_SI] = 0.0
    pack[P_STEP_N] = 0.0
    for j in range(c):
        cells[j, CH_STEP_SV] = 0.0
        cells[j, CH_STEP_STV] = 0.0
        cells[j, CH_STEP_TAINT] = 0.0
    if np.isfinite(current_a[k]):
        _step_add(k, t, current_a, volts, mask, cells, pack, 1.0)


@njit(cache=True, nogil=True)
def _step_add(k: int, t: FloatArray, current_a: FloatArray, volts: FloatArray,
              mask: BoolArray, cells: FloatArray, pack: FloatArray, discount: float) -> None:
    """Add row k to the window sums, after scaling the older weights by ``discount``."""
    c = cells.shape[0]
    x = t[k] - pack[P_STEP_TREF]
    pack[P_STEP_S1] = discount * pack[P_STEP_S1] + 1.0
    pack[P_STEP_ST] = discount * pack[P_STEP_ST] + x
    pack[P_STEP_STT] = discount * pack[P_STEP_STT] + x * x
    pack[P_STEP_SI] = discount * pack[P_STEP_SI] + current_a[k]
    pack[P_STEP_N] += 1.0
    for j in range(c):
        v = volts[k, j]
        if mask[k, j] and np.isfinite(v):
            cells[j, CH_STEP_SV] = discount * cells[j, CH_STEP_SV] + v
            cells[j, CH_STEP_STV] = discount * cells[j, CH_STEP_STV] + x * v
        else:
            cells[j, CH_STEP_TAINT] = 1.0


@njit(cache=True, nogil=True)
def _step_line(pack: FloatArray, sv: float, stv: float, at: float) -> tuple[float, float]:
    """(value at time ``at``, slope) of the weighted least-squares line through the window."""
    s1 = pack[P_STEP_S1]
    st = pack[P_STEP_ST]
    stt = pack[P_STEP_STT]
    det = s1 * stt - st * st
    slope = 0.0
    if det > 1e-12 * s1 * s1:
        slope = (s1 * stv - st * sv) / det
    level = (sv - slope * st) / s1
    return level + slope * (at - pack[P_STEP_TREF]), slope


@njit(cache=True, nogil=True)
def dcir_steps(t: FloatArray, current_a: FloatArray, volts: FloatArray, mask: BoolArray,
               temps: FloatArray, soc: FloatArray, cells: FloatArray, pack: FloatArray,
               min_step_a: float, max_dt_s: float, pre_tau_s: float, post_min_s: float,
               post_max_s: float, level_s: float, r0_max_ohm: float,
               ) -> tuple[IntArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """DC internal resistance from current steps, back-extrapolated to the step instant.

    The detector keeps a window of samples whose current is steady (within
    ``STEP_STEADY_FRACTION`` of the step threshold of the window's mean). Before a step it is a
    discounted least-squares line per cell (time constant ``pre_tau_s``, at least a few samples),
    i.e. the recent voltage and its drift. A *step* is a sample whose current differs from the
    window's mean by at least ``min_step_a``, within ``max_dt_s`` of the previous sample, after at
    least ``STEP_MIN_PRE`` steady samples. Its instant te is the midpoint of the two samples
    around it (where in between the current changed is unknown). The pre-step line gives
    V_pre(te). Then a new window collects the steady samples after the step, for ``post_max_s``,
    or until the current changes again if that is after ``post_min_s`` (and ``STEP_MIN_POST``
    samples); sooner, the step is abandoned. The post-step voltage at te is the mean of the
    samples within ``level_s`` of te (at least the first), carried back to te along the slope of
    the post-step line: the RC polarisation that builds up after the step is not ohmic.
    R0 = (V_pre(te) − V_post(te)) / (I_post − I_pre) for every cell valid throughout both
    windows, kept when it lies in (0, ``r0_max_ohm``). The post-step window goes on as the
    pre-step window of the next step.

    Rows 1.. of the inputs are new (row 0 is the previous sample); ``current_a`` is offset
    corrected, ``volts`` aligned, ``temps`` per cell and ``soc`` the pack's mean cell SOC, both
    kept as of the step's first sample. Returns, per accepted step, the row of its last
    post-step sample, its ΔI (A), a row of per-cell R0 (NaN for cells without an estimate), the
    cells' temperatures and the SOC at the step.
    """
    n, c = volts.shape
    capacity = 4
    rows = np.empty(capacity, np.int64)
    deltas = np.empty(capacity)
    r0 = np.empty((capacity, c))
    step_temps = np.empty((capacity, c))
    step_soc = np.empty(capacity)
    found = 0
    tolerance = STEP_STEADY_FRACTION * min_step_a
    for k in range(1, n):
        dt = t[k] - t[k - 1]
        i = current_a[k]
        if (not (np.isfinite(i) and 0.0 < dt <= max_dt_s and min_step_a > 0.0)
                or pack[P_STEP_N] < 1.0):
            _step_restart(k, t, current_a, volts, mask, cells, pack)
            continue
        mean = pack[P_STEP_SI] / pack[P_STEP_S1]
        steady = abs(i - mean) <= tolerance
        if pack[P_STEP_PHASE] > 0.5:
            if steady:
                _step_add(k, t, current_a, volts, mask, cells, pack, 1.0)
                _step_level(k, t, volts, mask, cells, pack, level_s)
                if t[k] - pack[P_STEP_TE] < post_max_s or pack[P_STEP_N] < STEP_MIN_POST:
                    continue
                evaluated = k
            elif (t[k - 1] - pack[P_STEP_TE] >= post_min_s
                  and pack[P_STEP_N] >= STEP_MIN_POST):
                evaluated = k - 1  # the current moved on: evaluate, then see what row k is
            else:
                _step_restart(k, t, current_a, volts, mask, cells, pack)
                continue
            pack[P_STEP_PHASE] = 0.0  # the post window goes on as the next pre-step window
            if found == capacity:
                capacity *= 2
                grown_rows = np.empty(capacity, np.int64)
                grown_rows[:found] = rows[:found]
                rows = grown_rows
                grown_deltas = np.empty(capacity)
                grown_deltas[:found] = deltas[:found]
                deltas = grown_deltas
                grown = np.empty((capacity, c))
                grown[:found] = r0[:found]
                r0 = grown
                grown = np.empty((capacity, c))
                grown[:found] = step_temps[:found]
                step_temps = grown
                grown_soc = np.empty(capacity)
                grown_soc[:found] = step_soc[:found]
                step_soc = grown_soc
            delta_i = _step_evaluate(cells, pack, min_step_a, r0_max_ohm, r0[found])
            if np.isfinite(delta_i):
                rows[found] = evaluated
                deltas[found] = delta_i
                for j in range(c):
                    step_temps[found, j] = cells[j, CH_STEP_TEMP]
                step_soc[found] = pack[P_STEP_SOC]
                found += 1
            if evaluated == k:
                continue
            mean = pack[P_STEP_SI] / pack[P_STEP_S1]
        # Collecting the pre-step window.
        if abs(i - mean) >= min_step_a and pack[P_STEP_N] >= STEP_MIN_PRE:
            te = 0.5 * (t[k - 1] + t[k])
            for j in range(c):
                vpre = np.nan
                if cells[j, CH_STEP_TAINT] < 0.5:
                    vpre, _ = _step_line(pack, cells[j, CH_STEP_SV], cells[j, CH_STEP_STV], te)
                cells[j, CH_STEP_VPRE] = vpre
                cells[j, CH_STEP_LEVEL] = 0.0
                cells[j, CH_STEP_TEMP] = temps[k, j]
            pack[P_STEP_SOC] = soc[k]
            _step_restart(k, t, current_a, volts, mask, cells, pack)
            pack[P_STEP_PHASE] = 1.0
            pack[P_STEP_TE] = te
            pack[P_STEP_IPRE] = mean
            pack[P_STEP_LEVEL_N] = 0.0
            pack[P_STEP_LEVEL_T] = 0.0
            _step_level(k, t, volts, mask, cells, pack, level_s)
        elif abs(i - mean) > tolerance:
            _step_restart(k, t, current_a, volts, mask, cells, pack)
        else:
            if t[k] - pack[P_STEP_TREF] > _STEP_REREF_S:
                _step_reref(t[k], cells, pack)
            memory = max(pre_tau_s, STEP_MIN_PRE * dt)
            _step_add(k, t, current_a, volts, mask, cells, pack, np.exp(-dt / memory))
    return (rows[:found].copy(), deltas[:found].copy(), r0[:found].copy(),
            step_temps[:found].copy(), step_soc[:found].copy())


@njit(cache=True, nogil=True)
def _step_evaluate(cells: FloatArray, pack: FloatArray, min_step_a: float, r0_max_ohm: float,
                   out: FloatArray) -> float:
    """R0 per cell of the step whose post window is complete, into ``out``; its ΔI, or NaN."""
    c = cells.shape[0]
    out[:] = np.nan
    te = pack[P_STEP_TE]
    delta_i = pack[P_STEP_SI] / pack[P_STEP_S1] - pack[P_STEP_IPRE]
    level_n = pack[P_STEP_LEVEL_N]
    if level_n < 1.0 or abs(delta_i) < min_step_a:
        return np.nan
    level_t = te + pack[P_STEP_LEVEL_T] / level_n
    used = False
    for j in range(c):
        if cells[j, CH_STEP_TAINT] > 0.5 or np.isnan(cells[j, CH_STEP_VPRE]):
            continue
        _, slope = _step_line(pack, cells[j, CH_STEP_SV], cells[j, CH_STEP_STV], te)
        vpost = cells[j, CH_STEP_LEVEL] / level_n - slope * (level_t - te)
        r = (cells[j, CH_STEP_VPRE] - vpost) / delta_i
        if 0.0 < r < r0_max_ohm:
            out[j] = r
            used = True
    return delta_i if used else np.nan


@njit(cache=True, nogil=True)
def _step_level(k: int, t: FloatArray, volts: FloatArray, mask: BoolArray, cells: FloatArray,
                pack: FloatArray, level_s: float) -> None:
    """Add row k to the post-step level if it is among the first samples after the step."""
    offset = t[k] - pack[P_STEP_TE]
    if pack[P_STEP_LEVEL_N] >= 1.0 and offset > level_s:
        return
    c = cells.shape[0]
    pack[P_STEP_LEVEL_N] += 1.0
    pack[P_STEP_LEVEL_T] += offset
    for j in range(c):
        cells[j, CH_STEP_LEVEL] += volts[k, j] if mask[k, j] else np.nan


@njit(cache=True, nogil=True)
def _step_reref(origin: float, cells: FloatArray, pack: FloatArray) -> None:
    """Move the window sums' time origin to ``origin`` (same line, smaller numbers)."""
    shift = origin - pack[P_STEP_TREF]
    s1 = pack[P_STEP_S1]
    st = pack[P_STEP_ST]
    pack[P_STEP_STT] = pack[P_STEP_STT] - 2.0 * shift * st + shift * shift * s1
    pack[P_STEP_ST] = st - shift * s1
    pack[P_STEP_TREF] = origin
    for j in range(cells.shape[0]):
        cells[j, CH_STEP_STV] -= shift * cells[j, CH_STEP_SV]


@njit(cache=True, nogil=True)
def rls_update(t: FloatArray, current_a: FloatArray, volts: FloatArray, mask: BoolArray,
               rest_s: FloatArray, cells: FloatArray, pack: FloatArray, tau_s: float,
               memory_s: float, max_gap_s: float) -> None:
    """Recursive least squares with forgetting on a 1-RC cell model; state in place.

    Model: V = OCV − R0·I − R1·x with x the current through a first-order filter of time
    constant ``tau_s`` (the RC branch). Differencing consecutive samples removes the OCV up to its
    drift, which is proportional to the charge moved: ΔV = −R0·ΔI − R1·Δx − κ·I·dt. The
    regressors (−ΔI, −Δx, −I·dt) are the same for every cell, so one covariance serves the whole
    pack and each cell keeps only θ = (R0, R1, κ) — the regressors are the measured current, not
    the noisy voltage, so the estimate is free of the bias an ARX form would carry. Updates run
    only while the pack is not at rest (no excitation, nothing to learn); the covariance is
    forgotten with time constant ``memory_s`` while its trace is below ``RLS_TRACE_MAX``, so long
    steady periods cannot wind it up. Rows 1.. are new; row 0 is the previous sample.
    """
    n, c = volts.shape
    # Written out for 3 × 3: numba's matrix products need a BLAS this daemon does not ship.
    p = np.empty((3, 3))
    for r in range(3):
        for q in range(3):
            p[r, q] = pack[P_RLS_P + 3 * r + q]
    phi = np.empty(3)
    p_phi = np.empty(3)
    gain = np.empty(3)
    for k in range(1, n):
        dt = t[k] - t[k - 1]
        i0 = current_a[k - 1]
        i1 = current_a[k]
        if not (0.0 < dt <= max_gap_s and np.isfinite(i0) and np.isfinite(i1)):
            for j in range(c):
                cells[j, CH_RLS_LAST_V] = volts[k, j] if mask[k, j] else np.nan
            pack[P_RLS_X] = i1 if np.isfinite(i1) else 0.0
            continue
        a = np.exp(-dt / tau_s)
        x_old = pack[P_RLS_X]
        x_new = a * x_old + (1.0 - a) * i0
        pack[P_RLS_X] = x_new
        if rest_s[k] < 0.0:
            phi[0] = -(i1 - i0)
            phi[1] = -(x_new - x_old)
            phi[2] = -0.5 * (i0 + i1) * dt
            trace = p[0, 0] + p[1, 1] + p[2, 2]
            forget = np.exp(-dt / memory_s) if trace < RLS_TRACE_MAX else 1.0
            denom = forget
            for r in range(3):
                p_phi[r] = p[r, 0] * phi[0] + p[r, 1] * phi[1] + p[r, 2] * phi[2]
                denom += phi[r] * p_phi[r]
            for r in range(3):
                gain[r] = p_phi[r] / denom
            for j in range(c):
                last = cells[j, CH_RLS_LAST_V]
                if not (mask[k, j] and np.isfinite(last)):
                    continue
                error = (volts[k, j] - last) - (phi[0] * cells[j, CH_RLS_R0]
                                                + phi[1] * cells[j, CH_RLS_R1]
                                                + phi[2] * cells[j, CH_RLS_KAPPA])
                cells[j, CH_RLS_R0] += gain[0] * error
                cells[j, CH_RLS_R1] += gain[1] * error
                cells[j, CH_RLS_KAPPA] += gain[2] * error
                e2 = cells[j, CH_RLS_E2]
                cells[j, CH_RLS_E2] = error * error if np.isnan(e2) else e2 + (
                    _RLS_ERROR_SMOOTHING * (error * error - e2))
            for r in range(3):
                for q in range(3):
                    p[r, q] = (p[r, q] - gain[r] * p_phi[q]) / forget
            for r in range(3):
                for q in range(r + 1, 3):
                    mean = 0.5 * (p[r, q] + p[q, r])
                    p[r, q] = mean
                    p[q, r] = mean
        for j in range(c):
            cells[j, CH_RLS_LAST_V] = volts[k, j] if mask[k, j] else np.nan
    for r in range(3):
        for q in range(3):
            pack[P_RLS_P + 3 * r + q] = p[r, q]


@njit(cache=True, nogil=True)
def ring_push(ring_r: npt.NDArray[np.float32], ring_t: npt.NDArray[np.float32],
              steps: IntArray, r0: FloatArray, temps: FloatArray) -> None:
    """Append each step's per-cell R0 (NaN: none) and temperature to the cells' rings, in place.

    A cell's ring holds its latest ``ring_r.shape[1]`` estimates; ``steps[j]`` counts every
    estimate cell j ever had, so the next goes to ``steps[j] % window``. Values are kept as
    float32: seven significant digits are far below a step's noise, and half the bytes.
    """
    window = ring_r.shape[1]
    for s in range(r0.shape[0]):
        for j in range(r0.shape[1]):
            r = r0[s, j]
            if np.isfinite(r):
                slot = steps[j] % window
                ring_r[j, slot] = np.float32(r)
                ring_t[j, slot] = np.float32(temps[s, j])
                steps[j] += 1


@njit(cache=True, nogil=True)
def r0_at_25c(ring_r: npt.NDArray[np.float32], ring_t: npt.NDArray[np.float32],
              steps: IntArray, b_k: float) -> tuple[FloatArray, FloatArray]:
    """Per cell, the median of its ring normalised to 25 °C, and that median's standard error.

    Each estimate taken at T is divided by the Arrhenius factor exp(b·(1/T − 1/T₂₅)), b = Ea/R in
    kelvin (an estimate without a temperature is taken as at 25 °C). The standard error is the
    robust spread (1.4826 × MAD) × 1.2533 / √n, that of a median of n normal values. NaN for a
    cell without estimates (and a spread of NaN below two).
    """
    c, window = ring_r.shape
    median = np.full(c, np.nan)
    sigma = np.full(c, np.nan)
    values = np.empty(window)
    for j in range(c):
        held = min(steps[j], window)
        if held == 0:
            continue
        for s in range(held):
            temp = ring_t[j, s]
            factor = 1.0
            if np.isfinite(temp):
                factor = np.exp(b_k * (1.0 / (temp + _KELVIN) - 1.0 / T_REF_K))
            values[s] = ring_r[j, s] / factor
        ordered = np.sort(values[:held])
        mid = held // 2
        m = ordered[mid] if held % 2 == 1 else 0.5 * (ordered[mid - 1] + ordered[mid])
        median[j] = m
        if held >= 2:
            deviations = np.sort(np.abs(ordered - m))
            mad = (deviations[mid] if held % 2 == 1
                   else 0.5 * (deviations[mid - 1] + deviations[mid]))
            sigma[j] = 1.4826 * mad * 1.2533 / np.sqrt(held)
    return median, sigma


@njit(cache=True, nogil=True)
def arrhenius_fit(ln_r: FloatArray, inv_t: FloatArray, held: IntArray, soc_bin: IntArray,
                  soc_bins: int, min_held: int, min_span_k: float) -> tuple[float, float]:
    """b = Ea/R (K) of ln R = a_s + b·(1/T − 1/T₂₅), from the temperature × SOC bins.

    Each bin (a row) holds up to ``ln_r.shape[1]`` step results: ln of the pack's median cell R0
    and 1/T (1/K). A bin with at least ``min_held`` results contributes one point, its medians.
    R0 depends on SOC as well, so each SOC bin gets its own intercept a_s and only the variation
    within an SOC bin determines b (least squares with fixed effects). Returns (b, its standard
    error); (NaN, NaN) when the points span less than ``min_span_k`` kelvin within SOC bins.
    """
    bins, window = ln_r.shape
    xs = np.full(bins, np.nan)
    ys = np.full(bins, np.nan)
    for b in range(bins):
        h = min(held[b], window)
        if h < min_held:
            continue
        ys[b] = np.median(ln_r[b, :h])
        xs[b] = np.median(inv_t[b, :h])
    # per SOC bin: how many temperature bins it has, and their mean (x, y)
    count = np.zeros(soc_bins, np.int64)
    mx = np.zeros(soc_bins)
    my = np.zeros(soc_bins)
    for b in range(bins):
        s = soc_bin[b]
        if 0 <= s < soc_bins and np.isfinite(xs[b]):
            count[s] += 1
            mx[s] += xs[b]
            my[s] += ys[b]
    groups = 0
    for s in range(soc_bins):
        if count[s] >= 2:
            mx[s] /= count[s]
            my[s] /= count[s]
            groups += 1
    sxx = 0.0
    sxy = 0.0
    points = 0
    t_lo = np.inf
    t_hi = -np.inf
    for b in range(bins):
        s = soc_bin[b]
        if 0 <= s < soc_bins and count[s] >= 2 and np.isfinite(xs[b]):
            sxx += (xs[b] - mx[s]) ** 2
            sxy += (xs[b] - mx[s]) * (ys[b] - my[s])
            points += 1
            t_lo = min(t_lo, 1.0 / xs[b])
            t_hi = max(t_hi, 1.0 / xs[b])
    if groups == 0 or t_hi - t_lo < min_span_k or sxx <= 0.0:
        return np.nan, np.nan
    slope = sxy / sxx
    dof = points - groups - 1
    if dof <= 0:
        return slope, np.nan
    residual = 0.0
    for b in range(bins):
        s = soc_bin[b]
        if 0 <= s < soc_bins and count[s] >= 2 and np.isfinite(xs[b]):
            residual += (ys[b] - my[s] - slope * (xs[b] - mx[s])) ** 2
    return slope, np.sqrt(residual / dof / sxx)


# ---------------------------------------------------------------------------------------------
# Capacity: Plett's approximate weighted total least squares


@njit(cache=True, nogil=True)
def _awtls_cost(c: FloatArray, r: float) -> float:
    numerator = (c[3] * r ** 4 - 2.0 * c[4] * r ** 3 + (c[0] + c[5]) * r * r
                 - 2.0 * c[1] * r + c[2])
    return float(numerator / (r * r + 1.0) ** 2)


@njit(cache=True, nogil=True)
def _awtls_curvature(c: FloatArray, r: float) -> float:
    """d²J/dr² of the AWTLS cost J = N(r)/(r² + 1)², written out from N, N′ and N″."""
    n0 = c[3] * r ** 4 - 2.0 * c[4] * r ** 3 + (c[0] + c[5]) * r * r - 2.0 * c[1] * r + c[2]
    n1 = 4.0 * c[3] * r ** 3 - 6.0 * c[4] * r * r + 2.0 * (c[0] + c[5]) * r - 2.0 * c[1]
    n2 = 12.0 * c[3] * r * r - 12.0 * c[4] * r + 2.0 * (c[0] + c[5])
    u = r * r + 1.0
    d0 = u ** -2
    d1 = -4.0 * r * u ** -3
    d2 = -4.0 * u ** -3 + 24.0 * r * r * u ** -4
    return float(n2 * d0 + 2.0 * n1 * d1 + n0 * d2)


@njit(cache=True, nogil=True)
def _quartic_real_roots(a: FloatArray) -> FloatArray:
    """Real roots of a[0]·r⁴ + … + a[4] (a[0] ≠ 0), by Durand–Kerner and Newton polishing."""
    monic = a / a[0]
    roots = np.empty(4, np.complex128)
    seed = 0.4 + 0.9j
    scale = 1.0 + np.max(np.abs(monic[1:]))
    for q in range(4):
        roots[q] = scale * seed ** (q + 1)
    for _ in range(500):
        moved = 0.0
        for q in range(4):
            z = roots[q]
            value = (((z + monic[1]) * z + monic[2]) * z + monic[3]) * z + monic[4]
            denom = 1.0 + 0.0j
            for other in range(4):
                if other != q:
                    denom *= z - roots[other]
            if denom == 0:
                denom = 1e-300 + 0.0j
            step = value / denom
            roots[q] = z - step
            moved = max(moved, abs(step) / (1.0 + abs(z)))
        if moved < 1e-15:
            break
    out = np.empty(4)
    found = 0
    for q in range(4):
        z = roots[q]
        if abs(z.imag) > 1e-7 * (1.0 + abs(z.real)):
            continue
        x = z.real
        for _ in range(8):  # Newton on the real polynomial removes the complex iteration's residue
            value = (((x + monic[1]) * x + monic[2]) * x + monic[3]) * x + monic[4]
            slope = ((4.0 * x + 3.0 * monic[1]) * x + 2.0 * monic[2]) * x + monic[3]
            if slope == 0.0:
                break
            x -= value / slope
        out[found] = x
        found += 1
    return out[:found].copy()


@njit(cache=True, nogil=True)
def awtls_update(c: FloatArray, x: FloatArray, y: FloatArray, var_x: FloatArray,
                 var_y: FloatArray, gamma: float,
                 update: BoolArray) -> tuple[FloatArray, FloatArray]:
    """Plett's AWTLS capacity estimators, one per row of ``c``; the sums are updated in place.

    Each estimator fits y = Q·x to pairs with errors in both: x = ΔSOC between two OCV points
    (variance ``var_x``), y = the charge counted between them (Ah, variance ``var_y``). Where
    ``update`` is set, the pair is added to the sums c1 … c6 (older pairs weighted by the
    forgetting factor ``gamma``), scaled by K = σx/σy of this pair (Plett, J. Power Sources 196
    (2011) 2319). The estimate minimises J(r) = Σ (y − Qx)² / (σy²(1 + r²)) with r = K·Q: the
    positive real root of the quartic J′(r) = 0 with the least cost. Its variance is
    2 / (J″·K²). Returns Q and its variance for every row (NaN where no estimate exists).
    """
    rows = c.shape[0]
    q = np.full(rows, np.nan)
    var_q = np.full(rows, np.nan)
    poly = np.empty(5)
    for i in range(rows):
        if (update[i] and var_x[i] > 0.0 and var_y[i] > 0.0 and np.isfinite(x[i])
                and np.isfinite(y[i])):
            k = np.sqrt(var_x[i] / var_y[i])
            c[i, 0] = gamma * c[i, 0] + x[i] * x[i] / var_y[i] / (k * k)
            c[i, 1] = gamma * c[i, 1] + x[i] * y[i] / var_y[i] / k
            c[i, 2] = gamma * c[i, 2] + y[i] * y[i] / var_y[i]
            c[i, 3] = gamma * c[i, 3] + x[i] * x[i] / var_x[i]
            c[i, 4] = gamma * c[i, 4] + x[i] * y[i] * k / var_x[i]
            c[i, 5] = gamma * c[i, 5] + y[i] * y[i] * k * k / var_x[i]
            c[i, 6] = k
        k = c[i, 6]
        if not (k > 0.0) or not (c[i, 4] > 0.0):
            continue
        poly[0] = c[i, 4]
        poly[1] = -c[i, 0] + 2.0 * c[i, 3] - c[i, 5]
        poly[2] = 3.0 * c[i, 1] - 3.0 * c[i, 4]
        poly[3] = c[i, 0] - 2.0 * c[i, 2] + c[i, 5]
        poly[4] = -c[i, 1]
        best = np.nan
        best_cost = np.inf
        for r in _quartic_real_roots(poly):
            if r > 0.0:
                cost = _awtls_cost(c[i], r)
                if cost < best_cost:
                    best_cost = cost
                    best = r
        if np.isnan(best):
            continue
        curvature = _awtls_curvature(c[i], best)
        q[i] = best / k
        if curvature > 0.0:
            var_q[i] = 2.0 / curvature / (k * k)
    return q, var_q


# ---------------------------------------------------------------------------------------------
# Passport counters and flags


@njit(cache=True, nogil=True)
def passport_counters(t: FloatArray, current_a: FloatArray, temps: FloatArray,
                      temp_mask: BoolArray, soc_pack: FloatArray, counters: FloatArray,
                      high_c: float, low_c: float, charging_a: float, max_gap_s: float) -> None:
    """Time at extreme temperatures (also while charging) and time per SOC and temperature bin.

    Each interval between consecutive samples (at most ``max_gap_s``) is credited to the state of
    its later sample: the hottest valid sensor at or above ``high_c``, the coldest at or below
    ``low_c``, charging when the current is below −``charging_a``; the pack SOC decile and the
    bin of the mean sensor temperature. Rows 1.. are new; ``temps``, ``temp_mask`` and
    ``soc_pack`` have a row per sample including row 0. ``counters`` (seconds) in place.
    """
    n = t.shape[0]
    s = temps.shape[1]
    for k in range(1, n):
        dt = t[k] - t[k - 1]
        if not (0.0 < dt <= max_gap_s):
            continue
        hottest = -np.inf
        coldest = np.inf
        total = 0.0
        count = 0
        for q in range(s):
            if temp_mask[k, q]:
                v = temps[k, q]
                hottest = max(hottest, v)
                coldest = min(coldest, v)
                total += v
                count += 1
        charging = current_a[k] < -charging_a
        if count:
            if hottest >= high_c:
                counters[C_TIME_HIGH] += dt
                if charging:
                    counters[C_TIME_HIGH_CHARGING] += dt
            if coldest <= low_c:
                counters[C_TIME_LOW] += dt
                if charging:
                    counters[C_TIME_LOW_CHARGING] += dt
            position = np.floor((total / count - TEMP_HIST_LO_C) / TEMP_HIST_STEP_C) + 1.0
            counters[C_TEMP_HIST + int(min(max(position, 0.0), TEMP_BINS - 1.0))] += dt
        soc = soc_pack[k]
        if np.isfinite(soc):
            decile = int(min(max(np.floor(soc * SOC_BINS), 0.0), SOC_BINS - 1.0))
            counters[C_SOC_HIST + decile] += dt


@njit(cache=True, nogil=True)
def robust_z(values: FloatArray, valid: BoolArray) -> tuple[FloatArray, float, float]:
    """Robust z-scores (x − median) / (1.4826·MAD) over the valid entries; median and scale.

    NaN for invalid entries, and everywhere when fewer than three are valid or the scale is 0.
    """
    c = values.shape[0]
    z = np.full(c, np.nan)
    count = 0
    for j in range(c):
        if valid[j] and np.isfinite(values[j]):
            count += 1
    if count < 3:
        return z, np.nan, np.nan
    picked = np.empty(count)
    count = 0
    for j in range(c):
        if valid[j] and np.isfinite(values[j]):
            picked[count] = values[j]
            count += 1
    median = np.median(picked)
    scale = 1.4826 * np.median(np.abs(picked - median))
    if not scale > 0.0:
        return z, median, scale
    for j in range(c):
        if valid[j] and np.isfinite(values[j]):
            z[j] = (values[j] - median) / scale
    return z, median, scale
