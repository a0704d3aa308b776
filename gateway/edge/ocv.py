"""Open-circuit-voltage tables per chemistry, and the voltage limits that go with them.

The SOC estimator resets from the relaxed cell voltage through the OCV curve, and the capacity
estimator takes ΔSOC between two such resets, so the curve is the model both rest on. A table is a
short list of (SOC, volts) points; it is turned once, when a pack's chemistry becomes known, into a
dense uniform SOC grid by monotone cubic (Fritsch–Carlson) interpolation, which keeps dOCV/dSOC
positive everywhere: the inverse (volts → SOC) is then unique and the slope, which sets the
uncertainty of an SOC read from a voltage, has no spurious zeros.

Built-in tables are typical published curves of NMC and LFP cells. They are a starting point: a
pack whose cells were characterised gets its own table from the configuration (``edge.ocv_soc``,
``edge.ocv_voltage_v``), which then applies to every pack of this gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.errors import ConfigError
from gateway.model import FloatArray

#: Points of the dense grid over SOC 0..1.
GRID_POINTS = 1001


@dataclass(frozen=True, slots=True)
class Chemistry:
    """What the edge core assumes of a cell chemistry unless the configuration says otherwise."""

    name: str
    ocv_soc: tuple[float, ...]
    ocv_v: tuple[float, ...]
    #: a cell below this (V) is deeply discharged; above ``overcharge_v`` overcharged
    deep_discharge_v: float
    overcharge_v: float


CHEMISTRIES: dict[str, Chemistry] = {c.name: c for c in (
    Chemistry(
        name="NMC",
        ocv_soc=(0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.55,
                 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.0),
        ocv_v=(3.000, 3.280, 3.430, 3.520, 3.565, 3.595, 3.618, 3.638, 3.657, 3.680, 3.708,
               3.740, 3.776, 3.815, 3.856, 3.898, 3.940, 3.982, 4.025, 4.070, 4.124, 4.200),
        deep_discharge_v=2.8, overcharge_v=4.25),
    Chemistry(
        name="LFP",
        ocv_soc=(0.0, 0.02, 0.05, 0.10, 0.15, 0.20, 0.30, 0.40, 0.50, 0.60, 0.65, 0.70, 0.80,
                 0.90, 0.95, 0.98, 1.0),
        ocv_v=(2.500, 2.950, 3.150, 3.215, 3.245, 3.265, 3.285, 3.297, 3.303, 3.310, 3.318,
               3.328, 3.334, 3.342, 3.365, 3.420, 3.600),
        deep_discharge_v=2.5, overcharge_v=3.65),
)}


@dataclass(frozen=True, slots=True)
class OcvCurve:
    """A dense, strictly increasing OCV curve: ``volts[k]`` at SOC ``soc[k]`` (0..1)."""

    soc: FloatArray
    volts: FloatArray
    #: dOCV/dSOC at each grid point (V per unit SOC), for the uncertainty of an SOC from a voltage
    slope: FloatArray


def build_curve(soc_points: Sequence[float], volt_points: Sequence[float], *,
                key: str = "edge.ocv_soc") -> OcvCurve:
    """The dense curve through a table; raises :class:`ConfigError` naming ``key`` if unusable."""
    soc = np.asarray(soc_points, dtype=np.float64)
    volts = np.asarray(volt_points, dtype=np.float64)
    if soc.ndim != 1 or soc.shape != volts.shape or soc.size < 2:
        raise ConfigError(f"needs at least two points and as many voltages as SOC values "
                          f"(got {soc.size} and {volts.size})", key=key)
    if not (np.all(np.isfinite(soc)) and np.all(np.isfinite(volts))):
        raise ConfigError("must hold finite numbers", key=key)
    if abs(soc[0]) > 1e-9 or abs(soc[-1] - 1.0) > 1e-9 or np.any(np.diff(soc) <= 0):
        raise ConfigError("SOC points must rise strictly from 0 to 1", key=key)
    if np.any(np.diff(volts) <= 0):
        raise ConfigError("voltages must rise strictly with SOC", key=key)
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    dense = _pchip(soc, volts, grid)
    # Monotone cubic interpolation of strictly rising data is non-decreasing, and flat only where
    # two neighbouring secants meet at a zero slope; a tiny ramp keeps the inverse unique there.
    dense = dense + np.linspace(0.0, 1e-9, GRID_POINTS)
    slope = np.gradient(dense, grid)
    return OcvCurve(soc=grid, volts=dense, slope=slope)


def _pchip(x: FloatArray, y: FloatArray, xi: FloatArray) -> FloatArray:
    """Monotone piecewise cubic Hermite interpolation (Fritsch and Carlson, 1980)."""
    h = np.diff(x)
    secant = np.diff(y) / h
    slopes = np.empty_like(y)
    if x.size == 2:
        slopes[:] = secant[0]
    else:
        # Interior slopes: a weighted harmonic mean of the neighbouring secants (Fritsch–Butland),
        # which never overshoots; both secants are positive for strictly rising data.
        w1 = 2.0 * h[1:] + h[:-1]
        w2 = h[1:] + 2.0 * h[:-1]
        slopes[1:-1] = (w1 + w2) / (w1 / secant[:-1] + w2 / secant[1:])
        slopes[0] = secant[0]
        slopes[-1] = secant[-1]
    k = np.clip(np.searchsorted(x, xi, side="right") - 1, 0, x.size - 2)
    u = (xi - x[k]) / h[k]
    h00 = (1.0 + 2.0 * u) * (1.0 - u) ** 2
    h10 = u * (1.0 - u) ** 2
    h01 = u * u * (3.0 - 2.0 * u)
    h11 = u * u * (u - 1.0)
    out: FloatArray = (h00 * y[k] + h10 * h[k] * slopes[k] + h01 * y[k + 1]
                       + h11 * h[k] * slopes[k + 1])
    return out


def chemistry_of(name: str) -> Chemistry | None:
    """The built-in chemistry of that name (case-insensitive), or None."""
    return CHEMISTRIES.get(name.strip().upper())
