"""Every numba kernel equals its plain-NumPy twin, and gives known answers on known inputs."""

from __future__ import annotations

import inspect
import math
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba.core.registry import CPUDispatcher

from gateway.edge import kernels, reference
from gateway.edge.kernels import (
    AH_CHARGE,
    AH_DISCHARGE,
    AH_TOTAL,
    WH_CHARGE,
    WH_DISCHARGE,
    WH_TOTAL,
)

KERNELS = {name: obj for name, obj in vars(kernels).items()
           if isinstance(obj, CPUDispatcher) and not name.startswith("_")}
PROPERTY = settings(max_examples=150, deadline=None)


def test_every_kernel_is_cached_nogil_and_has_a_twin_with_its_signature() -> None:
    assert set(KERNELS) == {"mask_plausible", "masked_stats", "integrate_throughput",
                            "r0_steps", "ring_median", "interval_ticks", "debounce"}
    for name, kernel in KERNELS.items():
        assert kernel.targetoptions.get("nogil") is True, name
        assert kernel._cache.__class__.__name__ != "NullCache", name
        twin = getattr(reference, name)
        assert inspect.signature(twin) == inspect.signature(kernel.py_func), name


# ---------------------------------------------------------------------------------------------
# Generated inputs: small shapes including zero rows, one row and zero columns; NaN where the data
# would be missing; times increasing, with row 0 sometimes NaN (the edge core's placeholder for
# "no previous sample").


@st.composite
def times(draw: st.DrawFn, n: int) -> np.ndarray:
    steps = draw(hnp.arrays(np.float64, n, elements=st.just(0.1) | st.floats(0.01, 15.0)))
    t = 1.7e9 + draw(st.floats(0, 1000)) + np.cumsum(steps)
    if n and draw(st.booleans()):
        t[0] = np.nan
    return t


def with_nans(draw: st.DrawFn, values: np.ndarray) -> np.ndarray:
    holes = draw(hnp.arrays(np.bool_, values.shape, elements=st.booleans()))
    if draw(st.booleans()):
        values = values.copy()
        values[holes] = np.nan
    return values


@st.composite
def batches(draw: st.DrawFn) -> dict[str, np.ndarray]:
    n = draw(st.integers(0, 12))
    c = draw(st.integers(0, 5))
    levels = st.sampled_from([-200.0, -50.0, -5.0, 0.0, 5.0, 50.0, 200.0])
    current = draw(hnp.arrays(np.float64, n, elements=levels | st.floats(-300, 300)))
    return {
        "t": draw(times(n)),
        "current": with_nans(draw, current),
        "voltage": with_nans(draw, draw(hnp.arrays(np.float64, n, elements=st.floats(0, 900)))),
        "cells": with_nans(draw, draw(hnp.arrays(np.float64, (n, c),
                                                 elements=st.floats(-1.0, 7.0)))),
        "valid": draw(hnp.arrays(np.bool_, (n, c), elements=st.sampled_from([True] * 3 + [False]))),
    }


@PROPERTY
@given(batches(), st.floats(-1.0, 3.0), st.floats(3.0, 8.0))
def test_mask_plausible_matches_reference(b: dict[str, np.ndarray], lo: float, hi: float) -> None:
    mask, implausible = kernels.mask_plausible(b["cells"], b["valid"], lo, hi)
    ref_mask, ref_implausible = reference.mask_plausible(b["cells"], b["valid"], lo, hi)
    np.testing.assert_array_equal(mask, ref_mask)
    assert implausible == ref_implausible


@PROPERTY
@given(batches())
def test_masked_stats_matches_reference(b: dict[str, np.ndarray]) -> None:
    # The edge core only passes masks from mask_plausible: masked-in values are finite.
    mask, _ = kernels.mask_plausible(b["cells"], b["valid"], 0.0, 6.0)
    stats, counts = kernels.masked_stats(b["cells"], mask)
    ref_stats, ref_counts = reference.masked_stats(b["cells"], mask)
    np.testing.assert_array_equal(counts, ref_counts)
    np.testing.assert_allclose(stats, ref_stats, rtol=1e-12, atol=1e-12, equal_nan=True)


@PROPERTY
@given(batches(), hnp.arrays(np.float64, 6, elements=st.floats(0, 1e5)),
       st.floats(0.5, 20.0))
def test_integrate_throughput_matches_reference(b: dict[str, np.ndarray], totals: np.ndarray,
                                                max_gap: float) -> None:
    out = kernels.integrate_throughput(b["t"], b["current"], b["voltage"], totals, max_gap)
    ref = reference.integrate_throughput(b["t"], b["current"], b["voltage"], totals, max_gap)
    assert out.shape == ref.shape == (len(b["t"]), 6)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    # Counters never decrease, and charge + discharge is the total.
    assert np.all(np.diff(out, axis=0) >= 0.0)
    np.testing.assert_allclose(out[:, AH_TOTAL] - totals[AH_TOTAL],
                               out[:, AH_CHARGE] + out[:, AH_DISCHARGE]
                               - totals[AH_CHARGE] - totals[AH_DISCHARGE], atol=1e-9)


@st.composite
def r0_state(draw: st.DrawFn, c: int) -> tuple[np.ndarray, np.ndarray]:
    window = draw(st.sampled_from([1, 3, 4, 16]))
    ring = draw(hnp.arrays(np.float64, (c, window), elements=st.floats(-0.01, 0.01)))
    steps = draw(hnp.arrays(np.int64, c, elements=st.integers(0, 40)))
    return ring, steps


@PROPERTY
@given(st.data(), batches(), st.floats(0.5, 120.0), st.floats(0.05, 20.0))
def test_r0_steps_matches_reference(data: st.DataObject, b: dict[str, np.ndarray],
                                    min_step: float, max_dt: float) -> None:
    ring, steps = data.draw(r0_state(b["cells"].shape[1]))
    ref_ring, ref_steps = ring.copy(), steps.copy()
    accepted = kernels.r0_steps(b["t"], b["current"], b["cells"], b["valid"], min_step, max_dt,
                                ring, steps)
    ref_accepted = reference.r0_steps(b["t"], b["current"], b["cells"], b["valid"], min_step,
                                      max_dt, ref_ring, ref_steps)
    assert accepted == ref_accepted
    np.testing.assert_array_equal(steps, ref_steps)
    np.testing.assert_array_equal(ring, ref_ring)
    np.testing.assert_array_equal(kernels.ring_median(ring, steps),
                                  reference.ring_median(ref_ring, ref_steps))


@PROPERTY
@given(st.data(), st.integers(0, 12), st.sampled_from([0.0, 0.1, 1.0, 7.5, 60.0]),
       st.floats(-100, 100))
def test_interval_ticks_matches_reference(data: st.DataObject, n: int, interval: float,
                                          origin_offset: float) -> None:
    t = data.draw(times(n))
    t = t[np.isfinite(t)]
    start = float(t[0]) if t.size else 1.7e9
    origin = start + origin_offset
    last = data.draw(st.just(-math.inf) | st.floats(start - 100, start + 20))
    ticks, last_tick = kernels.interval_ticks(t, origin, interval, last)
    ref_ticks, ref_last_tick = reference.interval_ticks(t, origin, interval, last)
    np.testing.assert_array_equal(ticks, ref_ticks)
    assert last_tick == ref_last_tick


@PROPERTY
@given(st.data(), st.integers(0, 15), st.integers(0, 4), st.sampled_from([0.0, 0.3, 2.0]))
def test_debounce_matches_reference(data: st.DataObject, n: int, c: int, hold: float) -> None:
    t = data.draw(times(n))
    values = data.draw(hnp.arrays(np.int64, (n, c), elements=st.integers(0, 2)))
    reported = data.draw(hnp.arrays(np.int64, c, elements=st.integers(0, 2)))
    candidate = data.draw(hnp.arrays(np.int64, c, elements=st.integers(0, 2)))
    since = data.draw(hnp.arrays(np.float64, c, elements=st.sampled_from(
        [np.nan, 1.7e9, 1.7e9 + 500.0])))
    state = (reported.copy(), candidate.copy(), since.copy())
    ref_state = (reported.copy(), candidate.copy(), since.copy())
    events, onsets = kernels.debounce(t, values, *state, hold)
    ref_events, ref_onsets = reference.debounce(t, values, *ref_state, hold)
    np.testing.assert_array_equal(events, ref_events)
    np.testing.assert_array_equal(onsets, ref_onsets)
    for mine, theirs in zip(state, ref_state, strict=True):
        np.testing.assert_array_equal(mine, theirs)


# ---------------------------------------------------------------------------------------------
# Known answers


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
def test_constant_discharge_for_an_hour_is_its_current_in_ah(impl: ModuleType) -> None:
    t = np.arange(0.0, 3600.0 + 0.5, 1.0)
    current = np.full(t.size, 50.0)
    voltage = np.full(t.size, 400.0)
    out = impl.integrate_throughput(t, current, voltage, np.zeros(6), 10.0)
    assert out[-1, AH_DISCHARGE] == pytest.approx(50.0, rel=1e-12)
    assert out[-1, AH_CHARGE] == 0.0
    assert out[-1, AH_TOTAL] == pytest.approx(50.0, rel=1e-12)
    assert out[-1, WH_DISCHARGE] == pytest.approx(20_000.0, rel=1e-12)
    assert out[-1, WH_CHARGE] == 0.0
    assert out[-1, WH_TOTAL] == pytest.approx(20_000.0, rel=1e-12)


def test_charging_current_counts_as_charge_and_a_zero_crossing_is_split() -> None:
    t = np.array([0.0, 360.0, 362.0])
    current = np.array([-10.0, -10.0, 10.0])  # 360 s of 10 A charge, then a ramp through zero
    out = kernels.integrate_throughput(t, current, np.full(3, 100.0), np.zeros(6), 400.0)
    # The ramp from −10 A to +10 A over 2 s is 1 s at a mean of 5 A each way: 5 A·s = 1/720 Ah.
    assert out[-1, AH_CHARGE] == pytest.approx(1.0 + 5.0 / 3600.0, rel=1e-12)
    assert out[-1, AH_DISCHARGE] == pytest.approx(5.0 / 3600.0, rel=1e-12)
    assert out[-1, AH_TOTAL] == pytest.approx(1.0 + 10.0 / 3600.0, rel=1e-12)
    assert out[-1, WH_CHARGE] == pytest.approx(100.0 + 500.0 / 3600.0, rel=1e-12)


def test_gaps_and_missing_values_are_not_integrated() -> None:
    t = np.array([0.0, 1.0, 100.0, 101.0, 102.0, 103.0])
    current = np.array([36.0, 36.0, 36.0, 36.0, np.nan, 36.0])
    voltage = np.array([10.0, 10.0, 10.0, np.nan, 10.0, 10.0])
    out = kernels.integrate_throughput(t, current, voltage, np.array([1, 2, 3, 4, 5, 6.0]), 10.0)
    # Integrated: 0→1 and 100→101 (Ah); the gap 1→100 and the intervals touching NaN current
    # are skipped. Energy only over 0→1: the voltage at 101 is unknown.
    assert out[-1, AH_DISCHARGE] == pytest.approx(2.0 + 2 * 36.0 / 3600.0)
    assert out[-1, WH_DISCHARGE] == pytest.approx(5.0 + 360.0 / 3600.0)
    assert out[0].tolist() == [1, 2, 3, 4, 5, 6.0]


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
def test_current_steps_on_cells_of_known_resistance_give_that_resistance(impl: ModuleType) -> None:
    r_true = np.array([0.8e-3, 1.0e-3, 1.5e-3])
    ocv = np.array([3.60, 3.61, 3.62])
    current = np.array([0.0, 0.0, 50.0, 50.0, 10.0, -40.0, -40.0, 0.0])
    t = np.arange(current.size) * 0.1
    volts = ocv[None, :] - current[:, None] * r_true[None, :]
    valid = np.ones(volts.shape, np.bool_)
    valid[4, 2] = False  # cell 2 misses the steps into and out of sample 4
    ring = np.zeros((3, 16))
    steps = np.zeros(3, np.int64)
    accepted = impl.r0_steps(t, current, volts, valid, 20.0, 1.0, ring,
                             steps)
    # Steps (|ΔI| ≥ 20 A): 0→50, 50→10, 10→−40, −40→0; cell 2 is invalid across two of them.
    assert accepted == 4
    assert steps.tolist() == [4, 4, 2]
    median = impl.ring_median(ring, steps)
    np.testing.assert_allclose(median, r_true, rtol=1e-9)


def test_r0_ring_keeps_the_latest_window_and_the_median_resists_outliers() -> None:
    ring = np.zeros((1, 8))
    steps = np.zeros(1, np.int64)
    current = np.array([0.0, 100.0] * 5)
    t = np.arange(current.size, dtype=np.float64)
    volts = (3.7 - current * 1e-3)[:, None]
    volts[3, 0] += 0.05  # one disturbed sample: two wild estimates among the eight kept
    kernels.r0_steps(t, current, volts, np.ones((10, 1), np.bool_), 10.0, 2.0, ring, steps)
    assert steps[0] == 9
    assert kernels.ring_median(ring, steps)[0] == pytest.approx(1e-3, rel=1e-9)
    assert np.isnan(kernels.ring_median(np.zeros((1, 4)), np.zeros(1, np.int64))[0])


def test_a_step_slower_than_the_limit_or_without_rated_threshold_is_not_used() -> None:
    t = np.array([0.0, 5.0])
    current = np.array([0.0, 100.0])
    volts = np.array([[3.7], [3.6]])
    valid = np.ones((2, 1), np.bool_)
    ring, steps = np.zeros((1, 4)), np.zeros(1, np.int64)
    assert kernels.r0_steps(t, current, volts, valid, 10.0, 2.0, ring, steps) == 0
    assert kernels.r0_steps(t, current, volts, valid, math.nan, 10.0, ring, steps) == 0
    assert steps[0] == 0


def test_interval_ticks_keep_a_fixed_grid_and_zero_means_every_sample() -> None:
    t = np.array([0.95, 1.02, 1.5, 1.98, 2.01, 2.99, 3.0, 5.5])
    ticks, last_tick = kernels.interval_ticks(t, 0.0, 1.0, -math.inf)
    assert np.flatnonzero(ticks).tolist() == [0, 1, 4, 6, 7]
    assert last_tick == 5.5
    ticks, _ = kernels.interval_ticks(t, 0.0, 1.0, 1.3)  # continuing after a tick at 1.3 s
    assert np.flatnonzero(ticks).tolist() == [4, 6, 7]
    ticks, _ = kernels.interval_ticks(t, 0.0, 0.0, -math.inf)
    assert ticks.all()


def test_debounce_reports_only_changes_that_hold() -> None:
    t = np.arange(10, dtype=np.float64)
    values = np.array([[0], [4], [0], [4], [4], [4], [4], [6], [6], [6]], np.int64)
    reported, candidate, since = np.zeros(1, np.int64), np.zeros(1, np.int64), np.full(1, np.nan)
    events, onsets = kernels.debounce(t, values, reported, candidate, since, 2.0)
    # 4 at t=1 flickers back; 4 from t=3 holds until t=5; 6 from t=7 holds until t=9.
    assert events.tolist() == [[5, 0, 0, 4], [9, 0, 4, 6]]
    assert onsets.tolist() == [3.0, 7.0]
    assert reported.tolist() == [6]
