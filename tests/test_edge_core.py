"""The edge core on synthetic samples with known answers, and its checkpoint/restore contract."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.config import EdgeSection
from gateway.edge.core import EVENT_HOLD_S, MAX_GAP_S, EdgeCore
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.model import Record, RecordKind, Sample
from gateway.store.sqlite import SqliteStore

T0 = 1_700_000_000.0
SERIAL = "PACK-0001"


def make_sample(ts: float, current_a: float = 0.0, *, serial: str = SERIAL,
                cells: Sequence[float] | None = None, valid: Sequence[bool] | None = None,
                temps: Sequence[float] | None = None, temp_valid: Sequence[bool] | None = None,
                pack_voltage_v: float | None = None, soc: float = 50.0, state: str = "drive",
                faults: int = 0, **extra: Any) -> Sample:
    volts = None if cells is None else np.asarray(cells, dtype=np.float64)
    if pack_voltage_v is None:
        pack_voltage_v = float(np.nansum(volts)) if volts is not None else 400.0
    return Sample(
        serial=serial, ts=ts, current_a=current_a, pack_voltage_v=pack_voltage_v,
        bms_soc_pct=soc, state=state, fault_flags=faults, cell_voltages_v=volts,
        cell_voltage_valid=None if valid is None else np.asarray(valid, dtype=np.bool_),
        cell_temps_c=None if temps is None else np.asarray(temps, dtype=np.float64),
        cell_temp_valid=None if temp_valid is None else np.asarray(temp_valid, dtype=np.bool_),
        **extra)


def run(core: EdgeCore, samples: Sequence[Sample], batch: int = 100) -> list[Record]:
    records: list[Record] = []
    for start in range(0, len(samples), batch):
        records.extend(core.process(samples[start:start + batch]))
    return records


def of_kind(records: Iterable[Record], kind: RecordKind) -> list[Record]:
    return [r for r in records if r.kind is kind]


def strict_json(records: Iterable[Record]) -> None:
    for record in records:
        json.dumps(record.body, allow_nan=False)


def mixed_scenario(seconds: float = 200.0, *, serial: str = SERIAL,
                   seed: int = 7) -> list[Sample]:
    """A 16-cell pack at 10 Hz: current steps both ways, noise, dropouts, faults, a gap."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 10)
    r_true = 1e-3 * (1.0 + 0.05 * np.arange(16))
    levels = rng.choice([-80.0, -20.0, 0.0, 15.0, 60.0, 150.0], size=n // 15 + 1)
    samples: list[Sample] = []
    faults = 0
    for k in range(n):
        ts = T0 + k / 10 + (30.0 if k >= n // 2 else 0.0)  # one gap of 30 s
        current = float(levels[k // 15])
        ocv = 3.6 + 0.3 * (1 - k / n)
        cells = ocv - current * r_true + rng.normal(0, 2e-4, 16)
        valid = np.ones(16, np.bool_)
        if 300 <= k < 380:
            valid[5] = False
        if k % 97 == 0:
            valid[rng.integers(16)] = False  # single-sample dropouts
        if k == 700:
            faults = 0b100
        if k == 900:
            faults = 0
        temps = 25.0 + 0.01 * k / 10 + rng.normal(0, 0.1, 4)
        samples.append(make_sample(ts, current, serial=serial, cells=cells, valid=valid,
                                   temps=temps, faults=faults, soc=80.0 - k / n * 30))
    return samples


# ---------------------------------------------------------------------------------------------
# Known answers


def test_constant_discharge_gives_known_charge_energy_and_full_cycles() -> None:
    core = EdgeCore(EdgeSection(rated_capacity_ah=50.0, telemetry_interval_s=1.0,
                                health_interval_s=60.0), Metrics())
    samples = [make_sample(T0 + k / 10, 100.0, pack_voltage_v=400.0) for k in range(3601)]
    records = run(core, samples)
    telemetry = of_kind(records, RecordKind.TELEMETRY)
    assert [r.ts for r in telemetry] == [T0 + s for s in range(361)]
    last = telemetry[-1].body
    assert last["capacity_throughput_discharge_ah"] == pytest.approx(10.0, rel=1e-9)
    assert last["capacity_throughput_charge_ah"] == 0.0
    assert last["capacity_throughput_ah"] == pytest.approx(10.0, rel=1e-9)
    assert last["energy_throughput_discharge_wh"] == pytest.approx(4000.0, rel=1e-9)
    health = of_kind(records, RecordKind.HEALTH)
    assert [r.ts for r in health] == [T0 + 60 * i for i in range(1, 7)]
    final = health[-1].body
    assert final["lastUpdate"] == "2023-11-14T22:19:20.000Z"  # T0 + 360 s
    assert final["capacityThroughputDischarge"] == pytest.approx(10.0, rel=1e-9)
    assert final["energyThroughput"] == pytest.approx(4.0, rel=1e-9)  # kWh
    assert final["ratedCapacity"] == 50.0
    assert final["numberOfFullCycles"] == pytest.approx(0.2, rel=1e-9)
    assert "r0_ohm" not in final and "r0_steps" not in final  # no per-cell data
    strict_json(records)


def test_charging_counts_separately_and_cycles_count_discharge_only() -> None:
    core = EdgeCore(EdgeSection(rated_capacity_ah=10.0, health_interval_s=100.0), Metrics())
    charge = [make_sample(T0 + k, -36.0, pack_voltage_v=50.0) for k in range(101)]
    discharge = [make_sample(T0 + 100 + k, 18.0, pack_voltage_v=50.0) for k in range(1, 201)]
    records = run(core, charge + discharge)
    health = of_kind(records, RecordKind.HEALTH)
    assert [r.ts for r in health] == [T0 + 100, T0 + 200, T0 + 300]
    body = health[-1].body
    # 100 s at 36 A charge = 1 Ah; the 1 s ramp from −36 A to 18 A splits by its zero crossing.
    ramp_charge = 0.5 * 36 * (36 / 54) / 3600
    ramp_discharge = 0.5 * 18 * (18 / 54) / 3600
    assert body["capacityThroughputCharge"] == pytest.approx(1.0 + ramp_charge, rel=1e-9)
    assert body["capacityThroughputDischarge"] == pytest.approx(1.0 - 18 / 3600 + ramp_discharge,
                                                                rel=1e-9)
    assert body["numberOfFullCycles"] == pytest.approx(
        body["capacityThroughputDischarge"] / 10.0, rel=1e-12)
    assert body["capacityThroughput"] == pytest.approx(
        body["capacityThroughputCharge"] + body["capacityThroughputDischarge"], rel=1e-12)


def test_current_steps_on_cells_of_known_resistance_give_that_resistance() -> None:
    r_true = np.array([0.8e-3, 1.0e-3, 1.2e-3, 2.5e-3])
    ocv = np.array([3.30, 3.31, 3.32, 3.33])
    core = EdgeCore(EdgeSection(rated_capacity_ah=100.0, min_step_c_rate=0.2,
                                health_interval_s=30.0), Metrics())
    samples = []
    for k in range(301):  # 30 s at 10 Hz; current alternates 10 A / 60 A every 2 s
        current = 60.0 if (k // 20) % 2 else 10.0
        samples.append(make_sample(T0 + k / 10, current, cells=ocv - current * r_true))
    health = of_kind(run(core, samples, batch=64), RecordKind.HEALTH)
    assert len(health) == 1
    r0 = health[0].body["r0_25c_ohm"]  # no temperatures: taken as measured at 25 °C
    assert r0["cells"] == pytest.approx(r_true.tolist(), abs=1e-7)
    assert r0["pack"] == pytest.approx(r_true.sum(), abs=4e-7)
    # A 50 A step every 2 s; 0.2 C = 20 A threshold. The step at the health sample itself has
    # no post-step window yet.
    assert health[0].body["r0_steps"] == 14


def test_r0_leaves_out_cells_without_estimates_and_the_pack_sum_until_all_have_one() -> None:
    core = EdgeCore(EdgeSection(rated_capacity_ah=100.0, health_interval_s=5.0), Metrics())
    samples = []
    for k in range(51):
        current = 60.0 if (k // 10) % 2 else 0.0
        samples.append(make_sample(T0 + k / 10, current, cells=[3.3 - current * 1e-3, 3.3],
                                   valid=[True, False]))
    body = of_kind(run(core, samples), RecordKind.HEALTH)[0].body
    assert body["r0_25c_ohm"]["cells"] == [pytest.approx(1e-3, abs=1e-7), None]
    assert "pack" not in body["r0_25c_ohm"]
    # Steps every second: each post-step window ends when the next step comes.
    assert body["r0_steps"] == 4


def test_without_any_rated_capacity_no_cycles_and_no_steps_are_invented() -> None:
    core = EdgeCore(EdgeSection(rated_capacity_ah=0.0, health_interval_s=5.0), Metrics())
    samples = [make_sample(T0 + k / 10, 60.0 if (k // 10) % 2 else 0.0, cells=[3.3, 3.3])
               for k in range(51)]
    body = of_kind(run(core, samples), RecordKind.HEALTH)[0].body
    assert "numberOfFullCycles" not in body and "ratedCapacity" not in body
    assert "r0_25c_ohm" not in body
    assert body["r0_steps"] == 0
    assert body["capacityThroughput"] > 0


def test_rated_capacity_comes_from_the_bus_unless_configured() -> None:
    samples = [make_sample(T0 + k, 36.0, rated_capacity_ah=20.0) for k in range(11)]
    from_bus = of_kind(run(EdgeCore(EdgeSection(health_interval_s=10.0), Metrics()), samples),
                       RecordKind.HEALTH)[0].body
    assert from_bus["ratedCapacity"] == 20.0
    assert from_bus["numberOfFullCycles"] == pytest.approx(0.1 / 20.0, rel=1e-9)
    configured = of_kind(run(EdgeCore(EdgeSection(health_interval_s=10.0,
                                                  rated_capacity_ah=40.0), Metrics()), samples),
                         RecordKind.HEALTH)[0].body
    assert configured["ratedCapacity"] == 40.0
    assert configured["numberOfFullCycles"] == pytest.approx(0.1 / 40.0, rel=1e-9)


def test_gaps_in_the_data_are_not_integrated() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=0.0), Metrics())
    resume = T0 + 10 + MAX_GAP_S + 1
    samples = [make_sample(T0, 36.0), make_sample(T0 + 10, 36.0), make_sample(resume, 36.0),
               make_sample(resume + 9, 36.0)]
    last = of_kind(core.process(samples), RecordKind.TELEMETRY)[-1].body
    assert last["capacity_throughput_ah"] == pytest.approx((10 + 9) * 36 / 3600, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Record contents


def test_telemetry_carries_the_latest_sample_rounded_with_invalid_cells_as_null() -> None:
    metrics = Metrics()
    core = EdgeCore(EdgeSection(telemetry_interval_s=0.0), metrics)
    sample = make_sample(T0 + 0.25, -12.5, cells=[3.712345, 3.70001, 9.0, 3.69, np.nan],
                         valid=[True, True, True, False, True], temps=[25.126, 80.0, 300.0],
                         temp_valid=[True, False, True], pack_voltage_v=14.8, soc=42.5,
                         state="charge", faults=5)
    (record,) = core.process([sample])
    assert record.kind is RecordKind.TELEMETRY and record.serial == SERIAL
    assert record.ts == T0 + 0.25
    body = record.body
    assert body["current_a"] == -12.5
    assert body["pack_voltage_v"] == 14.8
    assert body["bms_soc_pct"] == 42.5
    assert body["state"] == "charge"
    assert body["fault_flags"] == 5
    # 9.0 V is beyond cell_voltage_max_v and NaN is not a voltage: masked although flagged valid.
    assert body["cell_voltages_v"] == [3.7123, 3.7, None, None, None]
    assert body["cell_voltage_min_v"] == 3.7
    assert body["cell_voltage_max_v"] == 3.7123
    assert body["cell_voltage_mean_v"] == pytest.approx((3.712345 + 3.70001) / 2, abs=1e-4)
    assert body["cell_voltage_spread_v"] == pytest.approx(0.0123, abs=1e-4)
    assert body["cell_temps_c"] == [25.13, None, None]
    assert body["cell_temp_min_c"] == body["cell_temp_max_c"] == 25.13
    assert metrics.get("cell_values_masked_total", "voltage_range") == 2
    assert metrics.get("cell_values_masked_total", "temp_range") == 1
    assert body["capacity_throughput_ah"] == 0.0
    strict_json([record])


def test_a_min_max_only_bms_gets_its_extremes_and_no_invented_cells() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=0.0, health_interval_s=1.0,
                                rated_capacity_ah=10.0), Metrics())
    samples = [make_sample(T0 + k / 2, 20.0, min_cell_voltage_v=3.61, max_cell_voltage_v=3.65,
                           min_cell_temp_c=21.5, max_cell_temp_c=150.0) for k in range(3)]
    records = core.process(samples)
    body = of_kind(records, RecordKind.TELEMETRY)[-1].body
    assert "cell_voltages_v" not in body and "cell_temps_c" not in body
    assert body["cell_voltage_min_v"] == 3.61
    assert body["cell_voltage_max_v"] == 3.65
    assert body["cell_voltage_spread_v"] == pytest.approx(0.04)
    assert "cell_voltage_mean_v" not in body
    assert body["cell_temp_min_c"] == 21.5
    assert "cell_temp_max_c" not in body  # 150 °C is not plausible
    health = of_kind(records, RecordKind.HEALTH)[0].body
    assert "r0_25c_ohm" not in health and "r0_steps" not in health
    assert health["numberOfFullCycles"] == pytest.approx(20.0 / 3600 / 10.0)
    assert not of_kind(records, RecordKind.EVENTS)


def test_figures_the_bms_does_not_send_are_left_out_never_nan() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=0.0, health_interval_s=0.5), Metrics())
    nan = float("nan")
    samples = [make_sample(T0 + k / 2, nan, pack_voltage_v=nan, soc=nan, state="",
                           cells=[nan, nan], valid=[False, False]) for k in range(3)]
    records = core.process(samples)
    strict_json(records)
    telemetry = of_kind(records, RecordKind.TELEMETRY)[-1].body
    for absent in ("current_a", "pack_voltage_v", "bms_soc_pct", "state", "cell_voltage_min_v",
                   "cell_voltage_mean_v"):
        assert absent not in telemetry
    assert telemetry["cell_voltages_v"] == [None, None]
    health = of_kind(records, RecordKind.HEALTH)[0].body
    assert "bms_soc_pct" not in health and "numberOfFullCycles" not in health
    assert health["capacityThroughput"] == 0.0


def test_telemetry_interval_follows_measurement_time_on_a_fixed_grid() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=2.0), Metrics())
    samples = [make_sample(T0 + 0.5 + k * 0.3) for k in range(30)]  # 0.5 s … 9.2 s
    telemetry = of_kind(run(core, samples, batch=7), RecordKind.TELEMETRY)
    assert [round(r.ts - T0, 6) for r in telemetry] == [0.5, 2.0, 4.1, 6.2, 8.0]
    every = EdgeCore(EdgeSection(telemetry_interval_s=0.0), Metrics())
    assert len(of_kind(run(every, samples, batch=7), RecordKind.TELEMETRY)) == 30


def test_health_comes_once_the_pack_was_seen_for_an_interval_then_every_interval() -> None:
    core = EdgeCore(EdgeSection(health_interval_s=10.0), Metrics())
    samples = [make_sample(T0 + 0.5 + k) for k in range(36)]
    health = of_kind(run(core, samples, batch=4), RecordKind.HEALTH)
    assert [r.ts - T0 for r in health] == [10.5, 20.5, 30.5]


def test_samples_out_of_time_order_are_counted_and_skipped() -> None:
    metrics = Metrics()
    core = EdgeCore(EdgeSection(telemetry_interval_s=0.0), metrics)
    first = core.process([make_sample(T0 + 1, 36.0), make_sample(T0 + 2, 36.0),
                          make_sample(T0 + 2, 999.0), make_sample(T0 + 1.5, 999.0),
                          make_sample(T0 + 3, 36.0)])
    assert [r.ts - T0 for r in first] == [1, 2, 3]
    assert metrics.get("samples_rejected_total", "time_order") == 2
    second = core.process([make_sample(T0 + 3, 999.0), make_sample(T0 + 4, 36.0)])
    assert [r.ts - T0 for r in second] == [4]
    assert metrics.get("samples_rejected_total", "time_order") == 3
    assert second[0].body["capacity_throughput_ah"] == pytest.approx(3 * 36 / 3600, rel=1e-12)


def test_malformed_samples_are_counted_and_skipped() -> None:
    metrics = Metrics()
    core = EdgeCore(EdgeSection(telemetry_interval_s=0.0), metrics)
    records = core.process([
        make_sample(T0 + 1, cells=[3.6, 3.6], valid=[True]),
        make_sample(float("nan")),
        replace(make_sample(T0 + 2), cell_temps_c=np.zeros((2, 2))),
        make_sample(T0 + 3, cells=[3.6, 3.6]),
    ])
    assert [r.ts - T0 for r in records] == [3]
    assert metrics.get("samples_rejected_total", "malformed") == 3


def test_fault_flag_changes_are_events_once_they_hold() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=60.0), Metrics())
    flags = [0] * 10 + [4] + [0] * 10 + [4] * 40 + [6] * 40 + [0] * 40
    samples = [make_sample(T0 + k / 10, faults=f) for k, f in enumerate(flags)]
    events = of_kind(run(core, samples, batch=16), RecordKind.EVENTS)
    hold = int(EVENT_HOLD_S * 10)
    assert [round((r.ts - T0) * 10) for r in events] == [21 + hold, 61 + hold, 101 + hold]
    assert [r.body["events"] for r in events] == [
        [{"type": "fault_flags_changed", "fault_flags": 4, "previous": 0, "raised": [2],
          "cleared": [], "since": "2023-11-14T22:13:22.100Z"}],
        [{"type": "fault_flags_changed", "fault_flags": 6, "previous": 4, "raised": [1],
          "cleared": [], "since": "2023-11-14T22:13:26.100Z"}],
        [{"type": "fault_flags_changed", "fault_flags": 0, "previous": 6, "raised": [],
          "cleared": [1, 2], "since": "2023-11-14T22:13:30.100Z"}],
    ]


def test_a_cell_going_invalid_and_valid_again_is_an_event_a_dropout_is_not() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=60.0), Metrics())
    samples = []
    for k in range(150):
        valid = [True, True, True]
        if k == 5:
            valid[0] = False  # one-sample dropout
        if 20 <= k < 80:
            valid[2] = False
        cells = [3.6, 3.6, 3.6 if k != 100 else 7.5]  # one implausible reading: also a dropout
        samples.append(make_sample(T0 + k / 10, cells=cells, valid=valid))
    events = of_kind(run(core, samples), RecordKind.EVENTS)
    assert [[{k: v for k, v in e.items() if k != "since"} for e in r.body["events"]]
            for r in events] == [[{"type": "cell_voltage_invalid", "cell": 2}],
                                 [{"type": "cell_voltage_valid", "cell": 2}]]
    assert events[0].body["events"][0]["since"] == "2023-11-14T22:13:22.000Z"


def test_a_pack_starting_with_an_invalid_sensor_reports_it_once() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=60.0), Metrics())
    samples = [make_sample(T0 + k / 10, temps=[25.0, 25.0], temp_valid=[True, False])
               for k in range(60)]
    events = of_kind(run(core, samples), RecordKind.EVENTS)
    assert [e["type"] for r in events for e in r.body["events"]] == ["cell_temp_invalid"]
    assert events[0].body["events"][0]["sensor"] == 1


def test_a_changed_cell_layout_is_an_event_and_restarts_the_per_cell_estimates() -> None:
    core = EdgeCore(EdgeSection(rated_capacity_ah=100.0, health_interval_s=1.0), Metrics())
    samples = [make_sample(T0 + k / 10, 60.0 if k // 10 % 2 else 0.0,
                           cells=3.3 - (60.0 if k // 10 % 2 else 0.0) * np.full(4, 1e-3))
               for k in range(40)]
    samples += [make_sample(T0 + 4 + k / 10, 60.0 if k // 10 % 2 else 0.0,
                            cells=3.3 - (60.0 if k // 10 % 2 else 0.0) * np.full(3, 2e-3))
                for k in range(1, 41)]
    records = core.process(samples)
    events = of_kind(records, RecordKind.EVENTS)
    assert [r.body["events"] for r in events] == [[{
        "type": "layout_changed", "cells": 3, "previous_cells": 4, "sensors": 0,
        "previous_sensors": 0}]]
    health = of_kind(records, RecordKind.HEALTH)
    assert health[2].body["r0_25c_ohm"]["cells"] == [pytest.approx(1e-3, abs=1e-7)] * 4
    # The new layout's cells start without estimates and get their own.
    assert health[-1].body["r0_25c_ohm"]["cells"] == [pytest.approx(2e-3, abs=1e-7)] * 3


def test_several_packs_in_one_batch_are_kept_apart_and_records_are_in_time_order() -> None:
    core = EdgeCore(EdgeSection(telemetry_interval_s=0.0), Metrics())
    samples = []
    for k in range(20):
        samples.append(make_sample(T0 + k, 36.0, serial="A"))
        samples.append(make_sample(T0 + k + 0.5, -72.0, serial="B"))
    records = core.process(samples)
    assert [r.ts for r in records] == sorted(r.ts for r in records)
    last = {r.serial: r.body for r in records}
    assert last["A"]["capacity_throughput_discharge_ah"] == pytest.approx(19 * 36 / 3600)
    assert last["A"]["capacity_throughput_charge_ah"] == 0.0
    assert last["B"]["capacity_throughput_charge_ah"] == pytest.approx(19 * 72 / 3600)


# ---------------------------------------------------------------------------------------------
# Continuity: batching, checkpoints, restore


SCENARIO_SETTINGS = EdgeSection(rated_capacity_ah=50.0, telemetry_interval_s=1.0,
                                health_interval_s=20.0)


def test_lifetime_counters_never_go_backwards() -> None:
    records = run(EdgeCore(SCENARIO_SETTINGS, Metrics()), mixed_scenario())
    telemetry = of_kind(records, RecordKind.TELEMETRY)
    counters = [k for k in telemetry[0].body if "throughput" in k]
    assert len(counters) == 6
    for key in counters:
        series = [r.body[key] for r in telemetry]
        assert all(b >= a for a, b in itertools.pairwise(series)), key
        assert series[-1] > 0, key
    health = of_kind(records, RecordKind.HEALTH)
    # Every 20 s of measurement time; the 30 s gap swallows one interval.
    assert len(health) == 10 and all(r.body["r0_steps"] > 0 for r in health)
    strict_json(records)


@pytest.mark.parametrize("batch", [1, 7, 250, 5000])
def test_batching_does_not_change_any_record(batch: int) -> None:
    samples = mixed_scenario()
    whole = EdgeCore(SCENARIO_SETTINGS, Metrics()).process(samples)
    assert run(EdgeCore(SCENARIO_SETTINGS, Metrics()), samples, batch=batch) == whole
    kinds = {r.kind for r in whole}
    assert kinds == {RecordKind.TELEMETRY, RecordKind.HEALTH, RecordKind.EVENTS}


@pytest.mark.parametrize("split", [1, 999, 1000, 1377])
def test_restore_from_a_checkpoint_continues_exactly(split: int, tmp_path: Path) -> None:
    samples = mixed_scenario()
    uninterrupted = run(EdgeCore(SCENARIO_SETTINGS, Metrics()), samples)

    path = tmp_path / "store.sqlite"
    store = SqliteStore(path, max_bytes=1 << 30, max_records=1 << 20)
    first = EdgeCore(SCENARIO_SETTINGS, Metrics())
    before = run(first, samples[:split])
    store.commit(before, first.take_checkpoints())
    store.close()
    reopened = SqliteStore(path, max_bytes=1 << 30, max_records=1 << 20)
    second = EdgeCore(SCENARIO_SETTINGS, Metrics())
    second.restore(reopened.checkpoints())
    reopened.close()
    after = run(second, samples[split:])

    assert before + after == uninterrupted
    final = of_kind(after, RecordKind.TELEMETRY)[-1].body
    expected = of_kind(uninterrupted, RecordKind.TELEMETRY)[-1].body
    for key in ("capacity_throughput_ah", "capacity_throughput_charge_ah",
                "capacity_throughput_discharge_ah", "energy_throughput_wh"):
        assert final[key] == expected[key]


def test_a_changed_reporting_interval_applies_from_the_first_batch_after_a_restart() -> None:
    first = EdgeCore(EdgeSection(telemetry_interval_s=1.0, health_interval_s=10.0), Metrics())
    run(first, [make_sample(T0 + k) for k in range(30)])
    second = EdgeCore(EdgeSection(telemetry_interval_s=10.0, health_interval_s=5.0), Metrics())
    second.restore(first.take_checkpoints())
    records = run(second, [make_sample(T0 + 30 + k) for k in range(30)])
    assert [r.ts - T0 for r in of_kind(records, RecordKind.TELEMETRY)] == [30, 40, 50]
    assert [r.ts - T0 for r in of_kind(records, RecordKind.HEALTH)] == [30, 35, 40, 45, 50, 55]


def test_checkpoints_hold_only_the_packs_that_changed() -> None:
    core = EdgeCore(EdgeSection(), Metrics())
    assert core.process([]) == []
    assert core.take_checkpoints() == {}
    core.process([make_sample(T0, serial="A"), make_sample(T0, serial="B")])
    assert sorted(core.take_checkpoints()) == ["edge/A", "edge/B"]
    core.process([make_sample(T0 + 1, serial="B")])
    assert list(core.take_checkpoints()) == ["edge/B"]
    core.process([make_sample(T0 + 1, serial="B")])  # rejected: nothing changed
    assert core.take_checkpoints() == {}


# ---------------------------------------------------------------------------------------------
# warm_up


WARM_UP_PROBE = """
import json
from numba.core.registry import CPUDispatcher
from gateway.config import EdgeSection
from gateway.edge import kernels
from gateway.edge.core import EdgeCore
from gateway.metrics import Metrics
from tests.test_edge_core import SCENARIO_SETTINGS, T0, make_sample, mixed_scenario

dispatchers = {n: k for n, k in vars(kernels).items() if isinstance(k, CPUDispatcher)}
settings = EdgeSection(telemetry_interval_s=0, health_interval_s=1, rated_capacity_ah=50)
core = EdgeCore(settings, Metrics())
core.warm_up()
warm = {n: {str(s) for s in k.signatures} for n, k in dispatchers.items()}
samples = mixed_scenario(40.0)
core.process(samples[:200])
core.process([make_sample(T0 + k, 5.0, serial="MINMAX", min_cell_voltage_v=3.6)
              for k in range(3)])
again = EdgeCore(SCENARIO_SETTINGS, Metrics())
again.restore(core.take_checkpoints())
again.process(samples[200:])
used = {n: {str(s) for s in k.signatures} for n, k in dispatchers.items()}
print(json.dumps({n: sorted(used[n] - warm[n]) for n in used if used[n] - warm[n]}))
"""


def test_warm_up_compiles_every_kernel_signature_that_processing_uses(repo: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", WARM_UP_PROBE], cwd=repo, capture_output=True,
                           text=True, timeout=240, check=False)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {}


# ---------------------------------------------------------------------------------------------
# Estimator configuration


@pytest.mark.parametrize(("settings", "key", "message"), [
    ({"chemistry": "NCA"}, "edge.chemistry", "no built-in OCV curve"),
    ({"ocv_soc": [0.0, 0.5, 1.0], "ocv_voltage_v": [3.0, 3.6]}, "edge.ocv_soc", "as many"),
    ({"ocv_soc": [0.0, 0.5, 1.0], "ocv_voltage_v": [3.0, 3.7, 3.6]}, "edge.ocv_soc", "rise"),
    ({"ocv_soc": [0.1, 0.5, 1.0], "ocv_voltage_v": [3.0, 3.6, 4.0]}, "edge.ocv_soc", "from 0"),
])
def test_an_unusable_chemistry_or_ocv_table_is_a_configuration_error(
        settings: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        EdgeCore(EdgeSection(**settings), Metrics())
    assert caught.value.key == key


def test_a_configured_ocv_table_sets_the_soc_of_a_pack_of_any_chemistry() -> None:
    # A made-up linear cell, 3.0 V empty to 4.0 V full, that the BMS calls "LTO".
    core = EdgeCore(EdgeSection(rated_capacity_ah=10.0, health_interval_s=10.0,
                                ocv_soc=[0.0, 1.0], ocv_voltage_v=[3.0, 4.0]), Metrics())
    samples = [make_sample(T0 + k, 0.0, cells=[3.25, 3.75], chemistry="LTO") for k in range(11)]
    body = of_kind(core.process(samples), RecordKind.HEALTH)[0].body
    assert body["soc_cells_pct"] == [pytest.approx(25.0, abs=0.01), pytest.approx(75.0, abs=0.01)]
    # The string can deliver 2.5 Ah (the emptier cell) and take 2.5 Ah (the fuller one).
    assert body["stateOfCharge"] == pytest.approx(50.0, abs=0.01)
    assert body["chemistry"] == "LTO"


def test_the_current_offset_learned_at_rest_is_taken_out_of_the_counters() -> None:
    metrics = Metrics()
    core = EdgeCore(EdgeSection(rated_capacity_ah=50.0, telemetry_interval_s=0.0,
                                health_interval_s=100.0), metrics)
    # A sensor reading 0.3 A high: 60 s at rest, then 100 s at a true 36 A.
    samples = [make_sample(T0 + k, 0.3) for k in range(60)]
    samples += [make_sample(T0 + 60 + k, 36.3) for k in range(101)]
    records = run(core, samples, batch=17)
    last = of_kind(records, RecordKind.TELEMETRY)[-1].body
    # Until the offset was known (after 30 s of settling) 0.3 A was counted, the last interval
    # a trapezoid down to 0; then nothing at rest, and 36 A under load (the step into the load
    # a trapezoid from 0 to 36 A).
    expected = (29.5 * 0.3 + 0.5 * 36.0 + 100 * 36.0) / 3600
    assert last["capacity_throughput_ah"] == pytest.approx(expected, rel=1e-6)
    health = of_kind(records, RecordKind.HEALTH)[0].body
    assert health["current_offset_a"] == pytest.approx(0.3)


def test_stuck_and_jumping_cell_readings_are_masked_counted_and_reported() -> None:
    metrics = Metrics()
    core = EdgeCore(EdgeSection(telemetry_interval_s=60.0), metrics)
    samples = []
    for k in range(100):
        base = 3.9 - 0.002 * k  # the pack discharges: every cell falls 2 mV per sample
        cells = [base] * 5 + [3.86 if k >= 20 else base]  # cell 5 freezes from k = 20
        if k == 50:
            cells[0] += 0.4  # one reading jumps alone
        samples.append(make_sample(T0 + k / 10, 20.0, cells=cells))
    records = run(core, samples, batch=13)
    assert metrics.get("cell_values_masked_total", "voltage_jump") == 1
    assert metrics.get("cell_values_masked_total", "voltage_stuck") > 60
    events = [e for r in of_kind(records, RecordKind.EVENTS) for e in r.body["events"]]
    assert [(e["type"], e["cell"]) for e in events] == [("cell_voltage_invalid", 5)]
