"""Every numba kernel equals its plain-NumPy twin, and gives known answers on known inputs."""

from __future__ import annotations

import inspect
import math
from types import ModuleType
from typing import Any

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
from gateway.edge.ocv import CHEMISTRIES, build_curve
from gateway.edge.state import fresh_cell_matrix, fresh_pack_vector

KERNELS = {name: obj for name, obj in vars(kernels).items()
           if isinstance(obj, CPUDispatcher) and not name.startswith("_")}
PROPERTY = settings(max_examples=150, deadline=None)
NMC = build_curve(CHEMISTRIES["NMC"].ocv_soc, CHEMISTRIES["NMC"].ocv_v)


def test_every_kernel_is_cached_nogil_and_has_a_twin_with_its_signature() -> None:
    assert set(KERNELS) == {
        "mask_plausible", "masked_stats", "integrate_throughput", "interval_ticks", "debounce",
        "mask_jumps_and_stuck", "condition_current", "align_cells", "cell_temperatures",
        "soc_track", "pack_soc", "dcir_steps", "rls_update", "ring_push", "r0_at_25c",
        "arrhenius_fit", "awtls_update", "passport_counters", "robust_z"}
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


# ---------------------------------------------------------------------------------------------
# Estimator kernels against their twins. Inputs look like a pack's data: piecewise-constant
# currents with steps (and sometimes NaN), cell voltages that follow them through a resistance,
# rests, dropouts. Voltages are multiples of 2⁻¹⁰ V where a kernel compares sums exactly, so the
# two implementations' different summation orders cannot disagree at a threshold.


@st.composite
def pack_data(draw: st.DrawFn, max_rows: int = 40) -> dict[str, Any]:
    n = draw(st.integers(1, max_rows))
    c = draw(st.integers(1, 4))
    dt = draw(st.sampled_from([0.1, 1.0]))
    t = 1.7e9 + dt * np.arange(n) + draw(hnp.arrays(np.float64, n, elements=st.sampled_from(
        [0.0, 0.0, 0.0, 0.02])))
    if n > 3 and draw(st.booleans()):
        t[n // 2:] += draw(st.sampled_from([3.0, 30.0]))  # a long interval, or a gap
    levels = draw(st.lists(st.sampled_from([0.0, 0.0, 0.3, 20.0, 50.0, -25.0, np.nan]),
                           min_size=1, max_size=6))
    hold = draw(st.integers(1, 8))
    current = np.array([levels[(k // hold) % len(levels)] for k in range(n)])
    r = draw(hnp.arrays(np.float64, c, elements=st.sampled_from([1e-3, 1.5e-3, 2e-3])))
    noise = draw(hnp.arrays(np.float64, (n, c), elements=st.sampled_from([-1, 0, 0, 1])))
    volts = np.round((3.7 - np.nan_to_num(current)[:, None] * r + noise / 1024) * 1024) / 1024
    valid = draw(hnp.arrays(np.bool_, (n, c), elements=st.sampled_from([True] * 6 + [False])))
    return {"t": t, "current": current, "volts": volts, "valid": valid, "n": n, "c": c}


def fresh_estimator_state(c: int) -> tuple[np.ndarray, np.ndarray]:
    return fresh_pack_vector(), fresh_cell_matrix(c)


def twins(*arrays: np.ndarray) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    return tuple(a.copy() for a in arrays), tuple(a.copy() for a in arrays)


def assert_close(a: Any, b: Any, rtol: float = 1e-9) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=rtol, atol=1e-12, equal_nan=True)


@PROPERTY
@given(pack_data(), st.sampled_from([0.002, 0.02]), st.sampled_from([0.004, 0.15]))
def test_mask_jumps_and_stuck_matches_reference(d: dict[str, Any], stuck_dv: float,
                                                jump_v: float) -> None:
    (mask, ref), (ref_mask, ref_ref) = twins(d["valid"], np.full(d["c"], np.nan))
    out, stuck, jumped = kernels.mask_jumps_and_stuck(d["volts"], mask, ref, stuck_dv, jump_v)
    expected, ref_stuck, ref_jumped = reference.mask_jumps_and_stuck(d["volts"], ref_mask,
                                                                     ref_ref, stuck_dv, jump_v)
    np.testing.assert_array_equal(out, expected)
    assert (stuck, jumped) == (ref_stuck, ref_jumped)
    assert_close(ref, ref_ref)


@PROPERTY
@given(pack_data(), st.sampled_from([0.5, 1.0]), st.sampled_from([0.0, 0.3, 2.0]))
def test_condition_current_matches_reference(d: dict[str, Any], band: float,
                                             settle: float) -> None:
    (pack,), (ref_pack,) = twins(fresh_pack_vector())
    current = d["current"] + 0.2
    out = kernels.condition_current(d["t"], current, band, settle, 10.0, pack)
    expected = reference.condition_current(d["t"], current, band, settle, 10.0, ref_pack)
    for mine, theirs in zip(out, expected, strict=True):
        assert_close(mine, theirs)
    assert_close(pack, ref_pack)


@PROPERTY
@given(pack_data(), st.sampled_from([0.0, 0.03, 0.5, 5.0]))
def test_align_cells_matches_reference(d: dict[str, Any], lag: float) -> None:
    out, valid = kernels.align_cells(d["t"], d["volts"], d["valid"], lag)
    ref_out, ref_valid = reference.align_cells(d["t"], d["volts"], d["valid"], lag)
    assert_close(out, ref_out)
    np.testing.assert_array_equal(valid, ref_valid)


@PROPERTY
@given(st.data(), st.integers(0, 6), st.integers(0, 4), st.integers(1, 9))
def test_cell_temperatures_matches_reference(data: st.DataObject, n: int, s: int,
                                             c: int) -> None:
    temps = data.draw(hnp.arrays(np.float64, (n, s), elements=st.floats(-20, 60)))
    mask = data.draw(hnp.arrays(np.bool_, (n, s)))
    sensor_of_cell = (np.arange(c) * s // c).astype(np.int64)
    assert_close(kernels.cell_temperatures(temps, mask, sensor_of_cell),
                 reference.cell_temperatures(temps, mask, sensor_of_cell))


def run_soc_track(impl: ModuleType, d: dict[str, Any], pack: np.ndarray, cells: np.ndarray,
                  ocv_rest_s: float) -> tuple[np.ndarray, ...]:
    current, rest_s = kernels.condition_current(d["t"], d["current"], 0.5, 0.0, 10.0,
                                                pack.copy())
    return impl.soc_track(d["t"], current, rest_s, d["volts"], d["valid"], NMC.soc, NMC.volts,
                          np.full(d["c"], 50.0), cells, pack, ocv_rest_s, 0.5, 10.0)


@PROPERTY
@given(pack_data(max_rows=60), st.sampled_from([0.5, 2.0]))
def test_soc_track_matches_reference(d: dict[str, Any], ocv_rest_s: float) -> None:
    (pack, cells), (ref_pack, ref_cells) = twins(*fresh_estimator_state(d["c"]))
    out = run_soc_track(kernels, d, pack, cells, ocv_rest_s)
    expected = run_soc_track(reference, d, ref_pack, ref_cells, ocv_rest_s)
    np.testing.assert_array_equal(out[1], expected[1])
    for mine, theirs in zip(out, expected, strict=True):
        assert_close(mine, theirs)
    assert_close(cells, ref_cells)
    assert_close(pack, ref_pack)


@PROPERTY
@given(st.data(), st.integers(0, 5), st.integers(0, 4))
def test_pack_soc_matches_reference(data: st.DataObject, n: int, c: int) -> None:
    soc = data.draw(hnp.arrays(np.float64, (n, c), elements=st.floats(-0.1, 1.1) | st.just(
        np.nan)))
    capacity = data.draw(hnp.arrays(np.float64, c, elements=st.floats(0, 100)))
    assert_close(kernels.pack_soc(soc, capacity), reference.pack_soc(soc, capacity))


def run_dcir(impl: ModuleType, d: dict[str, Any], pack: np.ndarray, cells: np.ndarray,
             min_step: float) -> tuple[np.ndarray, ...]:
    temps = np.full(d["volts"].shape, 25.0)
    soc = np.linspace(0.9, 0.8, d["n"])
    return impl.dcir_steps(d["t"], d["current"], d["volts"], d["valid"], temps, soc, cells,
                           pack, min_step, 2.0, 2.0, 0.5, 2.0, 0.25, 1.0)


@PROPERTY
@given(pack_data(max_rows=60), st.sampled_from([10.0, 40.0]), st.integers(0, 40))
def test_dcir_steps_matches_reference(d: dict[str, Any], min_step: float, split: int) -> None:
    (pack, cells), (ref_pack, ref_cells) = twins(*fresh_estimator_state(d["c"]))
    out = run_dcir(kernels, d, pack, cells, min_step)
    expected = run_dcir(reference, d, ref_pack, ref_cells, min_step)
    np.testing.assert_array_equal(out[0], expected[0])
    for mine, theirs in zip(out, expected, strict=True):
        assert_close(mine, theirs)
    assert_close(cells, ref_cells)
    assert_close(pack, ref_pack)
    # Split anywhere, the detector gives the same steps (state carried in place).
    (pack, cells) = fresh_estimator_state(d["c"])
    cut = min(split, d["n"] - 1)
    first = {**d, **{k: d[k][:cut + 1] for k in ("t", "current", "volts", "valid")},
             "n": cut + 1}
    second = {**d, **{k: d[k][cut:] for k in ("t", "current", "volts", "valid")},
              "n": d["n"] - cut}
    a = run_dcir(kernels, first, pack, cells, min_step)
    b = run_dcir(kernels, {**second, "n": second["n"]}, pack, cells, min_step)
    assert_close(np.concatenate([a[2], b[2]]), out[2])


@PROPERTY
@given(pack_data(max_rows=60))
def test_rls_update_matches_reference(d: dict[str, Any]) -> None:
    (pack, cells), (ref_pack, ref_cells) = twins(*fresh_estimator_state(d["c"]))
    rest_s = np.where(np.nan_to_num(d["current"]) == 0.0, 1.0, -1.0)
    kernels.rls_update(d["t"], d["current"], d["volts"], d["valid"], rest_s, cells, pack, 20.0,
                       300.0, 10.0)
    reference.rls_update(d["t"], d["current"], d["volts"], d["valid"], rest_s, ref_cells,
                         ref_pack, 20.0, 300.0, 10.0)
    assert_close(cells, ref_cells, rtol=1e-6)
    assert_close(pack, ref_pack, rtol=1e-6)


@PROPERTY
@given(st.data(), st.integers(0, 4), st.integers(0, 30), st.integers(1, 5))
def test_ring_push_and_r0_at_25c_match_reference(data: st.DataObject, c: int, start: int,
                                                 steps: int) -> None:
    r0 = data.draw(hnp.arrays(np.float64, (steps, c), elements=st.floats(1e-4, 1e-2)
                              | st.just(np.nan)))
    temps = data.draw(hnp.arrays(np.float64, (steps, c), elements=st.floats(0, 50)
                                 | st.just(np.nan)))
    (ring, ring_t, held), (ref_ring, ref_t, ref_held) = twins(
        np.zeros((c, 4), np.float32), np.zeros((c, 4), np.float32), np.full(c, start, np.int64))
    kernels.ring_push(ring, ring_t, held, r0, temps)
    reference.ring_push(ref_ring, ref_t, ref_held, r0, temps)
    np.testing.assert_array_equal(ring, ref_ring)
    np.testing.assert_array_equal(ring_t, ref_t)
    np.testing.assert_array_equal(held, ref_held)
    for b in (0.0, 3600.0):
        assert_close(kernels.r0_at_25c(ring, ring_t, held, b),
                     reference.r0_at_25c(ring, ring_t, held, b), rtol=1e-6)


@PROPERTY
@given(st.data(), st.sampled_from([1, 2, 5]))
def test_arrhenius_fit_matches_reference(data: st.DataObject, soc_bins: int) -> None:
    bins = 3 * soc_bins
    held = data.draw(hnp.arrays(np.int64, bins, elements=st.integers(0, 6)))
    inv_t = 1.0 / (273.15 + data.draw(hnp.arrays(np.float64, (bins, 4),
                                                  elements=st.floats(0, 50))))
    ln_r = -7.0 + 3000.0 * (inv_t - 1 / 298.15) + data.draw(
        hnp.arrays(np.float64, (bins, 4), elements=st.floats(-0.05, 0.05)))
    soc_bin = np.tile(np.arange(soc_bins, dtype=np.int64), 3)
    assert_close(kernels.arrhenius_fit(ln_r, inv_t, held, soc_bin, soc_bins, 2, 5.0),
                 reference.arrhenius_fit(ln_r, inv_t, held, soc_bin, soc_bins, 2, 5.0),
                 rtol=1e-7)


@PROPERTY
@given(st.data(), st.integers(1, 4), st.integers(1, 6))
def test_awtls_update_matches_reference(data: st.DataObject, rows: int, updates: int) -> None:
    q_true = data.draw(hnp.arrays(np.float64, rows, elements=st.floats(20, 60)))
    sums, ref_sums = np.zeros((rows, 7)), np.zeros((rows, 7))
    for _ in range(updates):
        x = data.draw(hnp.arrays(np.float64, rows, elements=st.floats(-0.9, -0.1)
                                 | st.floats(0.1, 0.9)))
        noise = data.draw(hnp.arrays(np.float64, rows, elements=st.floats(-0.02, 0.02)))
        y = q_true * x * (1.0 + noise)
        var_x = data.draw(hnp.arrays(np.float64, rows, elements=st.floats(1e-6, 1e-3)))
        var_y = data.draw(hnp.arrays(np.float64, rows, elements=st.floats(1e-4, 1.0)))
        update = data.draw(hnp.arrays(np.bool_, rows))
        q, var_q = kernels.awtls_update(sums, x, y, var_x, var_y, 0.98, update)
        ref_q, ref_var_q = reference.awtls_update(ref_sums, x, y, var_x, var_y, 0.98, update)
        assert_close(sums, ref_sums)
        assert_close(q, ref_q, rtol=1e-6)
        assert_close(var_q, ref_var_q, rtol=1e-5)


@PROPERTY
@given(pack_data(), st.integers(0, 3), st.sampled_from([0.0, 5.0]))
def test_passport_counters_matches_reference(d: dict[str, Any], sensors: int,
                                             charging: float) -> None:
    temps = np.linspace(-30.0, 70.0, d["n"] * sensors).reshape(d["n"], sensors)
    mask = d["valid"][:, :sensors] if sensors <= d["c"] else np.ones((d["n"], sensors), bool)
    soc = np.linspace(-0.05, 1.05, d["n"])
    counters, ref_counters = np.zeros(kernels.COUNTER_SLOTS), np.zeros(kernels.COUNTER_SLOTS)
    kernels.passport_counters(d["t"], d["current"], temps, mask, soc, counters, 45.0, 0.0,
                              charging, 10.0)
    reference.passport_counters(d["t"], d["current"], temps, mask, soc, ref_counters, 45.0,
                                0.0, charging, 10.0)
    assert_close(counters, ref_counters)


@PROPERTY
@given(hnp.arrays(np.float64, st.integers(0, 8), elements=st.floats(-10, 10) | st.just(np.nan)),
       st.data())
def test_robust_z_matches_reference(values: np.ndarray, data: st.DataObject) -> None:
    valid = data.draw(hnp.arrays(np.bool_, values.shape))
    assert_close(kernels.robust_z(values, valid)[0], reference.robust_z(values, valid)[0])


# ---------------------------------------------------------------------------------------------
# Estimator kernels: known answers


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
def test_a_step_with_rc_polarisation_gives_r0_back_extrapolated(impl: ModuleType) -> None:
    """An exact 1-RC cell stepped from rest: the estimate is R0, not R0 plus polarisation."""
    r0, r1, tau = 1.0e-3, 0.6e-3, 15.0
    t = np.arange(0.0, 8.0, 0.1)
    current = np.where(t >= 3.0, 50.0, 0.0)
    v1 = r1 * current * (1.0 - np.exp(-np.clip(t - 3.0, 0.0, None) / tau))
    volts = (3.7 - current * r0 - v1)[:, None]
    pack, cells = fresh_estimator_state(1)
    _, delta, estimates, temps, soc = impl.dcir_steps(
        t, current, volts, np.ones(volts.shape, np.bool_), np.full(volts.shape, 30.0),
        np.full(t.shape, 0.6), cells, pack, 10.0, 2.0, 2.0, 0.5, 2.0, 0.25, 1.0)
    assert delta.tolist() == [50.0]
    # Half a sample of polarisation at most remains (the step instant is a sample's midpoint).
    assert estimates[0, 0] == pytest.approx(r0, rel=0.005)
    assert temps.tolist() == [[30.0]] and soc.tolist() == [0.6]
    # Without the back-extrapolation the first post-step sample alone would read R0 + 0.2 %.


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
def test_the_current_offset_is_learned_at_rest_and_subtracted(impl: ModuleType) -> None:
    t = np.arange(0.0, 100.0, 1.0)
    current = np.where((t >= 40) & (t < 70), 25.0, 0.0) + 0.25  # a 0.25 A offset throughout
    pack = fresh_pack_vector()
    corrected, rest_s = impl.condition_current(t, current, 0.5, 10.0, 10.0, pack)
    assert pack[kernels.P_OFFSET_A] == pytest.approx(0.25)
    assert corrected[45] == pytest.approx(25.0)
    assert rest_s[39] == 38.0 and rest_s[45] == -1.0 and rest_s[75] == 5.0


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
def test_soc_counts_charge_and_resets_from_the_ocv_after_a_rest(impl: ModuleType) -> None:
    """50 Ah cell, 0.5 h at 50 A from a relaxed 90 %, then a rest: an OCV point at each end."""
    dt = 10.0
    t = np.arange(0.0, 7200.0, dt)
    current = np.where((t >= 1800) & (t < 3600), 50.0, 0.0)
    soc_true = 0.9 - np.cumsum(np.concatenate(([0.0], current[:-1]))) * dt / 3600 / 50
    volts = np.interp(soc_true, NMC.soc, NMC.volts)[:, None]
    pack, cells = fresh_estimator_state(1)
    rest_s = np.where(t < 1800, t, np.where(t >= 3600, t - 3600, -1.0))
    rest_s[0] = 0.0
    found = []
    start = 0
    while start < t.size - 1:
        soc_rows, rows, point_soc, _, stats = impl.soc_track(
            t[start:], current[start:], rest_s[start:], volts[start:],
            np.ones((t.size - start, 1), np.bool_), NMC.soc, NMC.volts, np.full(1, 50.0), cells,
            pack, 900.0, 60.0, 100.0)
        found += [(start + r, s[0], st[kernels.PT_AH]) for r, s, st in zip(
            rows.tolist(), point_soc, stats, strict=True)]
        start += soc_rows.shape[0] if soc_rows.shape[0] else 1
    # Points: where the first rest ended (t = 1790 s) and within the second rest, every 900 s
    # once it had relaxed.
    assert [round(t[row]) for row, _, _ in found][:2] == [1790, 5390]
    assert found[0][1] == pytest.approx(0.9, abs=1e-4)
    assert found[1][1] == pytest.approx(0.4, abs=1e-4)
    assert found[1][2] == pytest.approx(25.0, rel=1e-9)  # Ah between the two points


@pytest.mark.parametrize("impl", [kernels, reference], ids=["numba", "numpy"])
def test_awtls_recovers_a_capacity_from_exact_pairs_with_its_uncertainty(
        impl: ModuleType) -> None:
    sums = np.zeros((1, kernels.AWTLS_SLOTS))
    for x in (0.8, -0.7, 0.75, -0.6):
        q, var_q = impl.awtls_update(sums, np.array([x]), np.array([45.0 * x]),
                                     np.array([1e-4]), np.array([0.04]), 1.0,
                                     np.array([True]))
    assert q[0] == pytest.approx(45.0, rel=1e-9)
    # Four pairs of ΔSOC ≈ 0.7 with σ(ΔSOC) = 0.01 and σ(Ah) = 0.2: σ(Q) ≈ 0.4 Ah.
    assert 0.2 < math.sqrt(var_q[0]) < 0.6


def test_arrhenius_fit_recovers_the_activation_energy_within_soc_bins() -> None:
    b_true = 30_000 / 8.314462618
    temps_c = np.array([5.0, 15.0, 25.0, 35.0])
    soc_bins = 2
    inv_t = np.repeat(1.0 / (temps_c + 273.15), soc_bins)[:, None] * np.ones((1, 4))
    soc_bin = np.tile(np.arange(soc_bins, dtype=np.int64), temps_c.size)
    offset = np.where(soc_bin == 1, 0.3, 0.0)[:, None]  # R0 30 % higher in one SOC bin
    ln_r = -7.0 + b_true * (inv_t - 1 / 298.15) + offset
    held = np.full(soc_bin.size, 4, np.int64)
    b, sigma = kernels.arrhenius_fit(ln_r, inv_t, held, soc_bin, soc_bins, 3, 8.0)
    assert b == pytest.approx(b_true, rel=1e-9)
    assert sigma == pytest.approx(0.0, abs=1e-6)
    held[2:] = 0  # one temperature only: no fit
    assert math.isnan(kernels.arrhenius_fit(ln_r, inv_t, held, soc_bin, soc_bins, 3, 8.0)[0])


def test_a_reading_that_jumps_alone_or_sticks_while_the_pack_moves_is_masked() -> None:
    volts = np.array([[3.70, 3.70, 3.70, 3.70], [3.69, 4.00, 3.69, 3.70],
                      [3.68, 3.68, 3.68, 3.70], [3.67, 3.67, 3.67, 3.70],
                      [3.66, 3.66, 3.66, 3.70]])
    mask = np.ones(volts.shape, np.bool_)
    out, stuck, jumped = kernels.mask_jumps_and_stuck(volts, mask, np.full(4, np.nan), 0.015,
                                                      0.15)
    # Cell 1 jumps by 0.31 V alone at row 1; cell 3 sits at 3.70 V while the others fall and
    # is stuck once the mean of the others has moved more than 15 mV since it was first seen
    # unchanged (row 1: mean 3.6933; row 3: 3.6775; row 4: 3.67).
    assert out.tolist() == [[True, False, True, True], [True, True, True, True],
                            [True, True, True, False], [True, True, True, False]]
    assert (stuck, jumped) == (2, 1)


def test_passport_counters_credit_time_at_extremes_and_per_bin() -> None:
    t = np.arange(0.0, 5.0)
    current = np.array([0.0, -10.0, -10.0, 5.0, 5.0])
    temps = np.array([[20.0], [50.0], [50.0], [-5.0], [22.0]])
    counters = np.zeros(kernels.COUNTER_SLOTS)
    kernels.passport_counters(t, current, temps, np.ones((5, 1), np.bool_),
                              np.array([0.5, 0.55, 0.05, 0.95, 1.0]), counters, 45.0, 0.0, 1.0,
                              10.0)
    assert counters[kernels.C_TIME_HIGH] == 2.0
    assert counters[kernels.C_TIME_HIGH_CHARGING] == 2.0
    assert counters[kernels.C_TIME_LOW] == 1.0
    assert counters[kernels.C_TIME_LOW_CHARGING] == 0.0
    soc_hist = counters[kernels.C_SOC_HIST:kernels.C_SOC_HIST + kernels.SOC_BINS]
    assert soc_hist.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]
    assert counters[kernels.C_TEMP_HIST:].sum() == 4.0
