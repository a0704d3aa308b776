"""Cell chemistries: open-circuit-voltage curves and the defaults that go with them.

An OCV curve is given as a short table of (SOC, volts) points taken from typical published curves
and turned once, at import, into a dense uniform grid by monotone cubic (Fritsch–Carlson)
interpolation. A uniform grid keeps the per-step lookup in the physics kernel to one multiply and
one linear interpolation, and monotone interpolation keeps dOCV/dSOC positive everywhere, so the
curve has no wiggles an estimator could lock onto.

Resistances are *specific* (Ω·Ah): a cell of capacity Q gets R = r_specific / Q, so the default
pack is sensible at any rated capacity. Thermal figures are per Ah for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

#: Points of the dense OCV grid over SOC 0..1 (inclusive).
OCV_GRID_POINTS = 1001


@dataclass(frozen=True, slots=True)
class Chemistry:
    """Defaults of one chemistry. Every figure can be overridden by a scenario."""

    name: str
    code: int  # the DBC's BMS_Info.Chemistry value
    ocv_soc: tuple[float, ...]
    ocv_v: tuple[float, ...]
    r0_ohm_ah: float
    r1_ohm_ah: float
    tau1_s: float
    r2_ohm_ah: float
    tau2_s: float
    charge_cv_v: float  # CC-CV charge voltage per cell
    discharge_cutoff_v: float  # end of a "full" discharge, under load
    protection_v_max: float
    protection_v_min: float
    balancing_min_v: float  # passive balancing only above this cell voltage


NMC = Chemistry(
    name="NMC",
    code=0,
    ocv_soc=(0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.55,
             0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.0),
    ocv_v=(3.000, 3.280, 3.430, 3.520, 3.565, 3.595, 3.618, 3.638, 3.657, 3.680, 3.708, 3.740,
           3.776, 3.815, 3.856, 3.898, 3.940, 3.982, 4.025, 4.070, 4.124, 4.200),
    r0_ohm_ah=0.050,
    r1_ohm_ah=0.030,
    tau1_s=15.0,
    r2_ohm_ah=0.040,
    tau2_s=400.0,
    charge_cv_v=4.20,
    discharge_cutoff_v=3.10,
    protection_v_max=4.25,
    protection_v_min=2.80,
    balancing_min_v=3.90,
)

LFP = Chemistry(
    name="LFP",
    code=1,
    ocv_soc=(0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50, 0.60, 0.65, 0.70, 0.80,
             0.90, 0.95, 0.98, 1.0),
    ocv_v=(2.500, 2.950, 3.150, 3.215, 3.245, 3.265, 3.285, 3.297, 3.303, 3.310, 3.318, 3.328,
           3.334, 3.342, 3.365, 3.420, 3.600),
    r0_ohm_ah=0.040,
    r1_ohm_ah=0.020,
    tau1_s=20.0,
    r2_ohm_ah=0.030,
    tau2_s=600.0,
    charge_cv_v=3.60,
    discharge_cutoff_v=2.80,
    protection_v_max=3.70,
    protection_v_min=2.50,
    balancing_min_v=3.38,
)

CHEMISTRIES: dict[str, Chemistry] = {c.name: c for c in (NMC, LFP)}


def _pchip(x: FloatArray, y: FloatArray, xi: FloatArray) -> FloatArray:
    """Monotone piecewise cubic Hermite interpolation (Fritsch–Carlson)."""
    h = np.diff(x)
    delta = np.diff(y) / h
    slopes = np.zeros_like(y)
    # Interior slopes: weighted harmonic mean where neighbouring secants agree in sign, else 0.
    same_sign = delta[:-1] * delta[1:] > 0
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:])
    slopes[1:-1] = np.where(same_sign, harmonic, 0.0)
    slopes[0] = delta[0]
    slopes[-1] = delta[-1]
    idx = np.clip(np.searchsorted(x, xi, side="right") - 1, 0, len(x) - 2)
    t = (xi - x[idx]) / h[idx]
    h00 = (1 + 2 * t) * (1 - t) ** 2
    h10 = t * (1 - t) ** 2
    h01 = t * t * (3 - 2 * t)
    h11 = t * t * (t - 1)
    result: FloatArray = (h00 * y[idx] + h10 * h[idx] * slopes[idx] + h01 * y[idx + 1]
                          + h11 * h[idx] * slopes[idx + 1])
    return result


def ocv_grid(chem: Chemistry) -> FloatArray:
    """The chemistry's OCV on a uniform SOC grid of :data:`OCV_GRID_POINTS` points over 0..1."""
    soc = np.linspace(0.0, 1.0, OCV_GRID_POINTS)
    return _pchip(np.asarray(chem.ocv_soc, dtype=np.float64),
                  np.asarray(chem.ocv_v, dtype=np.float64), soc)


def ocv_lookup(grid: FloatArray, soc: FloatArray | float) -> FloatArray:
    """OCV at ``soc`` from a uniform grid, with linear extrapolation beyond 0 and 1.

    The same arithmetic as the physics kernel's lookup, for code outside the kernel (truth,
    tests).
    """
    n = len(grid) - 1
    pos = np.asarray(soc, dtype=np.float64) * n
    idx = np.clip(np.floor(pos).astype(np.int64), 0, n - 1)
    frac = pos - idx
    result: FloatArray = grid[idx] + frac * (grid[idx + 1] - grid[idx])
    return result


def soc_from_ocv(grid: FloatArray, volts: FloatArray | float) -> FloatArray:
    """Inverse of :func:`ocv_lookup` (the grid is strictly increasing), clipped to 0..1."""
    soc = np.linspace(0.0, 1.0, len(grid))
    result: FloatArray = np.interp(np.asarray(volts, dtype=np.float64), grid, soc)
    return result


def energy_grid(grid: FloatArray) -> FloatArray:
    """Cumulative ∫₀^soc OCV dsoc on the same grid (V), by the trapezoid rule.

    A cell of capacity Q Ah at SOC s holds Q · E(s) Wh of chemical energy above empty; the
    truth uses it to report ``stored_wh`` so that energy balances can be checked.
    """
    step = 1.0 / (len(grid) - 1)
    result: FloatArray = np.concatenate(([0.0], np.cumsum((grid[1:] + grid[:-1]) * 0.5 * step)))
    return result
