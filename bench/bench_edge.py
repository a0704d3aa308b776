"""Edge-core cost per sample for one 192-cell pack: numba kernels against their NumPy twins.

Run from the repository root:  .venv/bin/python -m bench.bench_edge [--samples N] [--batch B]

Each kernel runs over batches of B consecutive samples (the shape ``EdgeCore.process`` gives it),
numba and the plain-NumPy reference on the same data in the same run; the table is µs per sample
(best of a few repeats, so other load on the machine inflates it least). The kernel rows are
every per-sample kernel of the edge core, called the way it calls them: plausibility masks,
current conditioning, alignment, throughput, SOC, the DC-IR step detector, RLS, passport
counters, limit statistics and debouncers, reporting ticks. The last rows are
``EdgeCore.process`` end to end (Python grouping, stacking, estimators, record building included)
at the daemon's default reporting intervals and with a telemetry record for every sample. The
target of the state-of-health issue is ≤ 20 µs per sample for the kernels.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from gateway.config import EdgeSection
from gateway.edge import kernels, reference
from gateway.edge.core import EVENT_HOLD_S, JUMP_V, MAX_GAP_S, MAX_STEP_DT_S, STUCK_DV_V, EdgeCore
from gateway.edge.estimators import (
    R0_MAX_OHM,
    REST_VOLTAGE_TAU_S,
    STEP_LEVEL_S,
    STEP_POST_MAX_S,
    STEP_POST_MIN_S,
    STEP_PRE_TAU_S,
)
from gateway.edge.ocv import CHEMISTRIES, build_curve
from gateway.edge.state import fresh_cell_matrix, fresh_pack_vector
from gateway.metrics import Metrics
from gateway.model import Sample

CELLS = 192
SENSORS = 32
RATED_AH = 100.0
NMC = build_curve(CHEMISTRIES["NMC"].ocv_soc, CHEMISTRIES["NMC"].ocv_v)


def synthetic(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """n samples at 10 Hz: current steps every 2 s with a rest every minute, cell voltages from
    the NMC curve with noise and rare dropouts."""
    rng = np.random.default_rng(seed)
    t = 1.7e9 + np.arange(n) / 10
    current = rng.choice([-50.0, 0.0, 20.0, 80.0, 150.0], size=n // 20 + 1).repeat(20)[:n]
    current[(np.arange(n) // 100) % 6 == 0] = 0.0
    soc = 0.8 - np.cumsum(current) / 10 / 3600 / RATED_AH
    r0 = rng.uniform(0.8e-3, 1.2e-3, CELLS)
    cells = (np.interp(soc, NMC.soc, NMC.volts)[:, None] - current[:, None] * r0[None, :]
             + rng.normal(0, 2e-4, (n, CELLS)))
    valid = rng.random((n, CELLS)) > 1e-3
    temps = 25.0 + rng.normal(0, 0.5, (n, SENSORS))
    return {"t": t, "current": current, "voltage": cells.sum(axis=1), "cells": cells,
            "valid": valid, "temps": temps, "temp_valid": np.ones((n, SENSORS), np.bool_),
            "faults": np.zeros((n, 1), np.int64)}


def kernel_calls(impl: ModuleType, data: dict[str, np.ndarray], batch: int) -> Callable[[], Any]:
    """One pass over the data in batches, calling every per-sample kernel as EdgeCore does."""
    n = data["t"].shape[0]
    starts = range(1, n, batch)

    def work() -> None:
        totals = np.zeros(kernels.THROUGHPUT_COLUMNS)
        pack, cells = fresh_pack_vector(), fresh_cell_matrix(CELLS)
        counters = np.zeros(kernels.COUNTER_SLOTS)
        stuck_ref = np.full(CELLS, np.nan)
        debouncers = [(np.ones(w, np.int64), np.ones(w, np.int64), np.full(w, np.nan))
                      for w in (1, CELLS, SENSORS, 4)]
        capacity = np.full(CELLS, RATED_AH)
        sensor_of_cell = (np.arange(CELLS) * SENSORS // CELLS).astype(np.int64)
        last_tick = -np.inf
        for start in starts:
            rows = slice(start - 1, min(start + batch, n))  # row 0: the previous sample
            t = data["t"][rows]
            mask, _ = impl.mask_plausible(data["cells"][rows], data["valid"][rows], 0.5, 5.0)
            mask[1:], _, _ = impl.mask_jumps_and_stuck(data["cells"][rows], mask, stuck_ref,
                                                       STUCK_DV_V, JUMP_V)
            temp_mask, _ = impl.mask_plausible(data["temps"][rows], data["temp_valid"][rows],
                                               -40.0, 100.0)
            current, rest_s = impl.condition_current(t, data["current"][rows], 1.0, 30.0,
                                                     MAX_GAP_S, pack)
            totals = impl.integrate_throughput(t, current, data["voltage"][rows], totals,
                                               MAX_GAP_S)[-1].copy()
            aligned, aligned_mask = impl.align_cells(t, data["cells"][rows], mask, 0.0)
            volts = np.vstack([data["cells"][rows][:1], aligned])
            volt_mask = np.vstack([mask[:1], aligned_mask])
            cell_temps = impl.cell_temperatures(data["temps"][rows], temp_mask, sensor_of_cell)
            soc_rows = impl.soc_track(t, current, rest_s, volts, volt_mask, NMC.soc, NMC.volts,
                                      capacity, cells, pack, 1800.0, REST_VOLTAGE_TAU_S,
                                      MAX_GAP_S)[0]
            soc_pack = impl.pack_soc(soc_rows, capacity)
            impl.dcir_steps(t, current, volts, volt_mask, cell_temps,
                            np.concatenate(([np.nan], soc_rows.mean(axis=1))), cells, pack,
                            0.2 * RATED_AH, MAX_STEP_DT_S, STEP_PRE_TAU_S, STEP_POST_MIN_S,
                            STEP_POST_MAX_S, STEP_LEVEL_S, R0_MAX_OHM)
            impl.rls_update(t, current, volts, volt_mask, rest_s, cells, pack, 20.0, 600.0,
                            MAX_GAP_S)
            impl.passport_counters(t, current, data["temps"][rows], temp_mask,
                                   np.concatenate(([np.nan], soc_pack)), counters, 45.0, 0.0,
                                   1.0, MAX_GAP_S)
            stats, counts = impl.masked_stats(data["cells"][rows][1:], mask[1:])
            limits = np.stack([counts > 0, stats[:, 0] < 2.8, stats[:, 1] > 4.25,
                               counts < 0], axis=1).astype(np.int64)
            ticks, last_tick = impl.interval_ticks(t[1:], 0.0, 1.0, last_tick)
            for values, state in zip((data["faults"][rows][1:], mask[1:].astype(np.int64),
                                      temp_mask[1:].astype(np.int64), limits), debouncers,
                                     strict=True):
                impl.debounce(t[1:], values, *state, EVENT_HOLD_S)
            picked = np.flatnonzero(ticks) + 1
            impl.masked_stats(data["cells"][rows][picked], mask[picked])
            impl.masked_stats(data["temps"][rows][picked], temp_mask[picked])

    return work


def samples_of(data: dict[str, np.ndarray]) -> list[Sample]:
    return [Sample(serial="BENCH", ts=float(data["t"][k]), current_a=float(data["current"][k]),
                   pack_voltage_v=float(data["voltage"][k]), bms_soc_pct=50.0, state="drive",
                   fault_flags=0, cell_voltages_v=data["cells"][k],
                   cell_voltage_valid=data["valid"][k], cell_temps_c=data["temps"][k],
                   cell_temp_valid=data["temp_valid"][k], rated_capacity_ah=RATED_AH,
                   chemistry="NMC")
            for k in range(data["t"].shape[0])]


def process_calls(samples: list[Sample], batch: int, settings: EdgeSection) -> Callable[[], Any]:
    def work() -> None:
        core = EdgeCore(settings, Metrics())
        for start in range(0, len(samples), batch):
            core.process(samples[start:start + batch])
            core.take_checkpoints()

    return work


def best_us_per_sample(work: Callable[[], Any], n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data = synthetic(args.samples)
    EdgeCore(EdgeSection(), Metrics()).warm_up()
    kernel_calls(kernels, data, args.batch)()  # loads anything warm_up does not cover

    rows = [("kernels, numba", best_us_per_sample(kernel_calls(kernels, data, args.batch),
                                                  args.samples, args.repeats)),
            ("kernels, NumPy reference", best_us_per_sample(
                kernel_calls(reference, data, args.batch), args.samples, 1))]
    samples = samples_of(data)
    for label, settings in (
            ("EdgeCore.process, default intervals", EdgeSection(rated_capacity_ah=RATED_AH)),
            ("EdgeCore.process, telemetry every sample",
             EdgeSection(rated_capacity_ah=RATED_AH, telemetry_interval_s=0.0))):
        rows.append((label, best_us_per_sample(process_calls(samples, args.batch, settings),
                                               args.samples, args.repeats)))

    print(f"edge core, {CELLS} cells, {SENSORS} sensors, {args.samples} samples in batches of "
          f"{args.batch}")
    print(f"{'path':<44}{'µs/sample':>12}{'vs numba':>10}")
    for label, cost in rows:
        print(f"{label:<44}{cost:>12.2f}{cost / rows[0][1]:>9.1f}x")


if __name__ == "__main__":
    main()
