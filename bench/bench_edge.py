"""Edge-core cost per sample for one 192-cell pack: numba kernels against their NumPy twins.

Run from the repository root:  .venv/bin/python -m bench.bench_edge [--samples N] [--batch B]

Each kernel runs over batches of B consecutive samples (the shape ``EdgeCore.process`` gives it),
numba and the plain-NumPy reference on the same data in the same run; the table is µs per sample
(best of a few repeats, so other load on the machine inflates it least). The last rows are
``EdgeCore.process`` end to end (Python grouping, stacking, record building included) at the
daemon's default reporting intervals and with a telemetry record for every sample. The target of
a later issue is ≤ 20 µs per sample for the kernels.
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
from gateway.edge.core import EVENT_HOLD_S, MAX_GAP_S, MAX_STEP_DT_S, EdgeCore
from gateway.edge.state import R0_WINDOW
from gateway.metrics import Metrics
from gateway.model import Sample

CELLS = 192
SENSORS = 32
RATED_AH = 100.0


def synthetic(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    """n samples at 10 Hz: current steps every 2 s, cell voltages with noise and rare dropouts."""
    rng = np.random.default_rng(seed)
    t = 1.7e9 + np.arange(n) / 10
    current = rng.choice([-50.0, 0.0, 20.0, 80.0, 150.0], size=n // 20 + 1).repeat(20)[:n]
    r0 = rng.uniform(0.8e-3, 1.2e-3, CELLS)
    cells = 3.7 - current[:, None] * r0[None, :] + rng.normal(0, 2e-4, (n, CELLS))
    valid = rng.random((n, CELLS)) > 1e-3
    temps = 25.0 + rng.normal(0, 0.5, (n, SENSORS))
    return {"t": t, "current": current, "voltage": cells.sum(axis=1), "cells": cells,
            "valid": valid, "temps": temps, "temp_valid": np.ones((n, SENSORS), np.bool_),
            "faults": np.zeros((n, 1), np.int64)}


def kernel_calls(impl: ModuleType, data: dict[str, np.ndarray], batch: int) -> Callable[[], Any]:
    """One pass over the data in batches, calling every kernel the way EdgeCore does."""
    n = data["t"].shape[0]
    slices = [slice(start, min(start + batch, n)) for start in range(0, n, batch)]

    def work() -> None:
        totals = np.zeros(kernels.THROUGHPUT_COLUMNS)
        ring = np.zeros((CELLS, R0_WINDOW))
        cell_steps = np.zeros(CELLS, np.int64)
        debouncers = [(np.ones(w, np.int64), np.ones(w, np.int64), np.full(w, np.nan))
                      for w in (1, CELLS, SENSORS)]
        last_tick = -np.inf
        for rows in slices:
            t = data["t"][rows]
            mask, _ = impl.mask_plausible(data["cells"][rows], data["valid"][rows], 0.5, 5.0)
            temp_mask, _ = impl.mask_plausible(data["temps"][rows], data["temp_valid"][rows],
                                               -40.0, 100.0)
            totals = impl.integrate_throughput(t, data["current"][rows], data["voltage"][rows],
                                               totals, MAX_GAP_S)[-1].copy()
            ticks, last_tick = impl.interval_ticks(t, 0.0, 1.0, last_tick)
            impl.r0_steps(t, data["current"][rows], data["cells"][rows], mask,
                          0.2 * RATED_AH, MAX_STEP_DT_S, ring, cell_steps)
            for values, state in zip((data["faults"][rows], mask.astype(np.int64),
                                      temp_mask.astype(np.int64)), debouncers, strict=True):
                impl.debounce(t, values, *state, EVENT_HOLD_S)
            picked = np.flatnonzero(ticks)
            impl.masked_stats(data["cells"][rows][picked], mask[picked])
            impl.masked_stats(data["temps"][rows][picked], temp_mask[picked])
        impl.ring_median(ring, cell_steps)

    return work


def samples_of(data: dict[str, np.ndarray]) -> list[Sample]:
    return [Sample(serial="BENCH", ts=float(data["t"][k]), current_a=float(data["current"][k]),
                   pack_voltage_v=float(data["voltage"][k]), bms_soc_pct=50.0, state="drive",
                   fault_flags=0, cell_voltages_v=data["cells"][k],
                   cell_voltage_valid=data["valid"][k], cell_temps_c=data["temps"][k],
                   cell_temp_valid=data["temp_valid"][k], rated_capacity_ah=RATED_AH)
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
                kernel_calls(reference, data, args.batch), args.samples, args.repeats))]
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
