"""The pack's physics, one numba kernel that advances all cells over many time steps.

Model per cell i (series string, so every cell carries the pack current I, positive = discharge,
plus its own balancing bleed and self-discharge, which never reach the pack terminals)::

    V_i   = OCV(soc_i) − I·R0_i − v1_i − v2_i                     terminal voltage
    v_k  ← v_k·e^(−dt/τk) + Rk_i·(1 − e^(−dt/τk))·I             two RC pairs, exact for a held I
    soc_i ← soc_i − (I + I_bal,i + I_leak,i)·dt / (3600·Q_i)
    R0_i  = R0_new,i · growth · A(T_i) · g(soc_i)                 (R1, R2 alike without g)
    A(T)  = exp(Ea/R · (1/T − 1/298.15 K))                        Arrhenius, 1 at 25 °C
    Q_i   = Q_new,i · (1 − fade)
    fade  = a_efc·EFC_age + a_cal·√days_age,  growth = 1 + b_efc·EFC_age + b_cal·√days_age
    C_th·dT_i/dt = I²R0 + v1²/R1 + v2²/R2 + OCV·I_leak − h_i(T_i − T_amb) + k(T_{i±1} − T_i)

The current is held over each step (zero-order hold), the RC update is the exact solution for a
held current, and the state recorded for step k is the state at the *start* of step k together
with the current that flows during it. That is what the BMS samples at time k·dt.

The kernel also runs the charger's constant-voltage limit, the segment stop conditions, the
passive balancing decision and the protection state machine, because all of them need the state
of every step and a call per step from Python would cost more than the physics.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

GAS_CONSTANT = 8.314462618  # J/(mol·K)
KELVIN = 273.15
T_REF_K = 298.15  # 25 °C

# Pack state codes (DBC BMS_PackStatus.PackState).
STANDBY, DRIVE, CHARGE, FAULT = 0, 1, 2, 3

# Fault flag bits (DBC BMS_PackStatus.FaultFlags).
FLAG_OVERVOLTAGE = 1 << 0
FLAG_UNDERVOLTAGE = 1 << 1
FLAG_OVERTEMP = 1 << 2
FLAG_UNDERTEMP = 1 << 3
FLAG_OVERCURRENT = 1 << 4
FLAG_SENSOR = 1 << 6

# Why a kernel call returned.
RAN_ALL, STOPPED, TRIPPED, CLEARED = 0, 1, 2, 3

# Indices into the scalar parameter vector ``par``.
P_DT = 0
P_EA_OVER_R = 1
P_SOC_LOW_GAIN = 2
P_SOC_HIGH_GAIN = 3
P_TAU1 = 4
P_TAU2 = 5
P_ACCEL = 6
P_FADE_EFC = 7
P_FADE_CAL = 8
P_GROW_EFC = 9
P_GROW_CAL = 10
P_INIT_EFC = 11
P_INIT_DAYS = 12
P_RATED_AH = 13
P_COUPLING = 14
P_AMBIENT = 15
P_SWING = 16
P_HOUR0 = 17
P_BAL_ENABLED = 18
P_BAL_THRESHOLD = 19
P_BAL_CURRENT = 20
P_BAL_MIN_V = 21
P_BAL_STEPS = 22
P_V_MAX = 23
P_V_MIN = 24
P_T_MAX = 25
P_T_MIN = 26
P_I_MAX = 27
P_HOLD_STEPS = 28
N_PAR = 29

# Indices into the segment vector ``seg`` (nan = not used).
S_CV = 0
S_STOP_MIN_V = 1
S_STOP_MAX_V = 2
S_STOP_TAPER_A = 3
S_STOP_SOC_BELOW = 4
S_STOP_SOC_ABOVE = 5
S_STATE = 6
S_FAULT_HOLD = 7  # 1: contactors open, hold until cleared
N_SEG = 8

# Indices into the running totals ``acc`` (all from true values, at the pack terminals unless
# said otherwise).
A_DIS_AH = 0  # ∫max(I, 0) dt, Ah
A_CHG_AH = 1  # ∫max(−I, 0) dt, Ah
A_DIS_WH = 2  # ∫max(V_pack·I, 0) dt, Wh
A_CHG_WH = 3  # ∫max(−V_pack·I, 0) dt, Wh
A_HEAT_WH = 4  # heat generated in the cells (Joule and self-discharge), Wh
A_BAL_WH = 5  # energy the balancing bleed drew from the cells (at their OCV), Wh
N_ACC = 6

# Indices into the integer state ``ist``.
I_HOLD_ELAPSED = 0  # steps spent in the fault hold
I_LATCHED = 1  # fault flags that tripped the protection
N_IST = 2


@njit(cache=True, nogil=True)
def arrhenius(temp_c: float, ea_over_r: float) -> float:
    """Factor by which a resistance at ``temp_c`` exceeds its value at 25 °C."""
    return math.exp(ea_over_r * (1.0 / (temp_c + KELVIN) - 1.0 / T_REF_K))


@njit(cache=True, nogil=True)
def soc_factor(soc: float, low_gain: float, high_gain: float) -> float:
    """R0's SOC dependence, normalised to 1 at 50 % SOC: rises towards empty and full."""
    s = min(max(soc, 0.0), 1.0)
    raw = 1.0 + low_gain * math.exp(-s / 0.08) + high_gain * math.exp(-(1.0 - s) / 0.05)
    mid = 1.0 + low_gain * math.exp(-0.5 / 0.08) + high_gain * math.exp(-0.5 / 0.05)
    return raw / mid


@njit(cache=True, nogil=True)
def aging_factors(par: np.ndarray, dis_ah: float, t_s: float) -> tuple[float, float]:
    """(capacity fade fraction, resistance growth factor) at the given discharged Ah and time."""
    efc_age = par[P_INIT_EFC] + par[P_ACCEL] * dis_ah / par[P_RATED_AH]
    days_age = par[P_INIT_DAYS] + par[P_ACCEL] * t_s / 86400.0
    root = math.sqrt(days_age)
    fade = par[P_FADE_EFC] * efc_age + par[P_FADE_CAL] * root
    growth = 1.0 + par[P_GROW_EFC] * efc_age + par[P_GROW_CAL] * root
    return min(fade, 0.95), growth


@njit(cache=True, nogil=True)
def _ocv(grid: np.ndarray, soc: float) -> float:
    n = grid.shape[0] - 1
    pos = soc * n
    idx = math.floor(pos)
    idx = min(max(idx, 0), n - 1)
    return float(grid[idx] + (pos - idx) * (grid[idx + 1] - grid[idx]))


@njit(cache=True, nogil=True)
def advance(k0: int, n_steps: int, row0: int, demand: np.ndarray, seg: np.ndarray,
            par: np.ndarray, grid: np.ndarray,
            q_new: np.ndarray, r0_new: np.ndarray, r1_new: np.ndarray, r2_new: np.ndarray,
            leak: np.ndarray, cth: np.ndarray, hcool: np.ndarray,
            soc: np.ndarray, v1: np.ndarray, v2: np.ndarray, temp: np.ndarray,
            bal: np.ndarray, acc: np.ndarray, ist: np.ndarray,
            out_v: np.ndarray, out_soc: np.ndarray, out_temp: np.ndarray, out_bal: np.ndarray,
            out_i: np.ndarray, out_state: np.ndarray, out_flags: np.ndarray,
            out_acc: np.ndarray) -> tuple[int, int]:
    """Advance up to ``n_steps`` steps from global step ``k0``, writing rows from ``row0``.

    Returns (steps executed, reason). A stop condition is tested before a step is executed, so
    the step that meets it belongs to the next segment; a protection trip executes its step
    (the BMS sees the violation in that sample) and opens the contactors from the next.
    """
    n = soc.shape[0]
    dt = par[P_DT]
    e1 = math.exp(-dt / par[P_TAU1])
    e2 = math.exp(-dt / par[P_TAU2])
    ocv = np.empty(n)
    r0 = np.empty(n)
    r1 = np.empty(n)
    r2 = np.empty(n)
    q = np.empty(n)
    vt = np.empty(n)
    heat = np.empty(n)
    new_t = np.empty(n)
    cv = seg[S_CV]
    fault_hold = seg[S_FAULT_HOLD] > 0.5
    bal_steps = int(par[P_BAL_STEPS])
    for s in range(n_steps):
        k = k0 + s
        t_s = k * dt
        fade, growth = aging_factors(par, acc[A_DIS_AH], t_s)
        hour = par[P_HOUR0] + t_s / 3600.0
        ambient = par[P_AMBIENT] - par[P_SWING] * math.cos(2.0 * math.pi * (hour - 4.0) / 24.0)
        soc_mean = 0.0
        for c in range(n):
            arr = arrhenius(temp[c], par[P_EA_OVER_R])
            q[c] = q_new[c] * (1.0 - fade)
            r0[c] = r0_new[c] * growth * arr * soc_factor(soc[c], par[P_SOC_LOW_GAIN],
                                                          par[P_SOC_HIGH_GAIN])
            r1[c] = r1_new[c] * growth * arr
            r2[c] = r2_new[c] * growth * arr
            ocv[c] = _ocv(grid, soc[c])
            soc_mean += soc[c]
        soc_mean /= n

        # The current: held at zero in a fault, else the demand, limited by the charger's CV.
        if fault_hold:
            current = 0.0
        else:
            current = demand[s]
            if current < 0.0 and not math.isnan(cv):
                limit = -1e300
                for c in range(n):
                    need = -(cv - ocv[c] + v1[c] + v2[c]) / r0[c]
                    limit = max(limit, need)
                current = min(max(current, limit), 0.0)
        v_min = 1e300
        v_max = -1e300
        t_min = 1e300
        t_max = -1e300
        v_pack = 0.0
        for c in range(n):
            vt[c] = ocv[c] - current * r0[c] - v1[c] - v2[c]
            v_min = min(v_min, vt[c])
            v_max = max(v_max, vt[c])
            t_min = min(t_min, temp[c])
            t_max = max(t_max, temp[c])
            v_pack += vt[c]

        violations = 0
        if v_max > par[P_V_MAX]:
            violations |= FLAG_OVERVOLTAGE
        if v_min < par[P_V_MIN]:
            violations |= FLAG_UNDERVOLTAGE
        if t_max > par[P_T_MAX]:
            violations |= FLAG_OVERTEMP
        if t_min < par[P_T_MIN]:
            violations |= FLAG_UNDERTEMP
        if abs(current) > par[P_I_MAX]:
            violations |= FLAG_OVERCURRENT

        if fault_hold:
            if ist[I_HOLD_ELAPSED] >= par[P_HOLD_STEPS] and violations == 0:
                ist[I_LATCHED] = 0
                return s, CLEARED
            ist[I_HOLD_ELAPSED] += 1
            state = FAULT
            flags = violations | ist[I_LATCHED]
        else:
            if not math.isnan(seg[S_STOP_MIN_V]) and v_min <= seg[S_STOP_MIN_V]:
                return s, STOPPED
            if not math.isnan(seg[S_STOP_MAX_V]) and v_max >= seg[S_STOP_MAX_V]:
                return s, STOPPED
            if not math.isnan(seg[S_STOP_TAPER_A]) and -current < seg[S_STOP_TAPER_A]:
                return s, STOPPED
            if not math.isnan(seg[S_STOP_SOC_BELOW]) and soc_mean <= seg[S_STOP_SOC_BELOW]:
                return s, STOPPED
            if not math.isnan(seg[S_STOP_SOC_ABOVE]) and soc_mean >= seg[S_STOP_SOC_ABOVE]:
                return s, STOPPED
            state = int(seg[S_STATE])
            flags = violations
            if violations != 0:
                state = FAULT
                ist[I_LATCHED] = violations
                ist[I_HOLD_ELAPSED] = 0

        # Passive balancing: decided on the balancing period, only at rest or while charging.
        if k % bal_steps == 0:
            allowed = par[P_BAL_ENABLED] > 0.5 and state in (STANDBY, CHARGE)
            for c in range(n):
                bal[c] = 1 if (allowed and vt[c] > par[P_BAL_MIN_V]
                               and vt[c] - v_min > par[P_BAL_THRESHOLD]) else 0

        row = row0 + s
        for c in range(n):
            out_v[row, c] = vt[c]
            out_soc[row, c] = soc[c]
            out_temp[row, c] = temp[c]
            out_bal[row, c] = bal[c]
        out_i[row] = current
        out_state[row] = state
        out_flags[row] = flags
        for a in range(N_ACC):
            out_acc[row, a] = acc[a]

        # Advance the state over the step.
        heat_total = 0.0
        bal_power = 0.0
        for c in range(n):
            bleed = par[P_BAL_CURRENT] if bal[c] else 0.0
            heat[c] = (current * current * r0[c] + v1[c] * v1[c] / r1[c]
                       + v2[c] * v2[c] / r2[c] + ocv[c] * leak[c])
            heat_total += heat[c]
            bal_power += bleed * ocv[c]
            soc[c] -= (current + bleed + leak[c]) * dt / (3600.0 * q[c])
            v1[c] = v1[c] * e1 + r1[c] * (1.0 - e1) * current
            v2[c] = v2[c] * e2 + r2[c] * (1.0 - e2) * current
        for c in range(n):
            flow = heat[c] - hcool[c] * (temp[c] - ambient)
            if c > 0:
                flow += par[P_COUPLING] * (temp[c - 1] - temp[c])
            if c < n - 1:
                flow += par[P_COUPLING] * (temp[c + 1] - temp[c])
            new_t[c] = temp[c] + flow * dt / cth[c]
        for c in range(n):
            temp[c] = new_t[c]
        acc[A_DIS_AH] += max(current, 0.0) * dt / 3600.0
        acc[A_CHG_AH] += max(-current, 0.0) * dt / 3600.0
        acc[A_DIS_WH] += max(v_pack * current, 0.0) * dt / 3600.0
        acc[A_CHG_WH] += max(-v_pack * current, 0.0) * dt / 3600.0
        acc[A_HEAT_WH] += heat_total * dt / 3600.0
        acc[A_BAL_WH] += bal_power * dt / 3600.0
        if not fault_hold and violations != 0:
            return s + 1, TRIPPED
    return n_steps, RAN_ALL
