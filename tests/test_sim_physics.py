"""The simulator's physics: energy balance, relaxation, Arrhenius, aging, spread, leakage,
balancing, thermal, CC-CV, protection. Every check runs the real simulator end to end (truth
and, where it matters, the frames read back through cantools)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from firmware_sim import Simulator
from firmware_sim import physics as ph
from firmware_sim.chemistry import CHEMISTRIES, ocv_grid, ocv_lookup, soc_from_ocv
from firmware_sim.readback import read_back
from firmware_sim.scenario import deep_merge

# Frames cost more than physics; tests that only read the truth send them once a second.
SPARSE = {"protocol": {"pack_status_period_s": 1.0, "cell_stats_period_s": 1.0,
                       "cell_voltages_period_s": 1.0}}
NO_FADE = {"aging": {"capacity_fade_per_efc": 0.0, "capacity_fade_per_sqrt_day": 0.0,
                     "resistance_growth_per_efc": 0.0, "resistance_growth_per_sqrt_day": 0.0}}
IDEAL_SENSORS = {"sensors": {"voltage_noise_v": 0.0, "voltage_lsb_v": 0.0,
                             "pack_voltage_noise_v": 0.0, "current_noise_a": 0.0,
                             "current_offset_fs": 0.0, "current_gain_error": 0.0,
                             "current_lsb_a": 0.0, "temp_noise_c": 0.0, "temp_lsb_c": 0.0}}


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        out = deep_merge(out, part)
    return out


def truth_run(scenario: str, seconds: float, interval: float, **kwargs: Any
              ) -> list[dict[str, Any]]:
    sim = Simulator.from_scenario(scenario, **kwargs)
    rows: list[dict[str, Any]] = []
    sim.add_truth_sink(rows.append, interval)
    for _ in sim.batches(seconds):
        pass
    sim.finish_truth()
    return rows


def transitions(rows: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    """(index, from, to) at each state change."""
    return [(i, rows[i - 1]["state"], rows[i]["state"]) for i in range(1, len(rows))
            if rows[i]["state"] != rows[i - 1]["state"]]


def test_energy_balance_over_a_full_cycle() -> None:
    # cycling: rest, CC discharge to cut-off, rest, CC-CV charge, rest; without fade so that the
    # cells' stored energy is only moved by current, heat and the balancing bleed.
    rows = truth_run("cycling", 26_000, 10, cells=4, seed=2, overrides=merged(SPARSE, NO_FADE))
    back_to_drive = [i for i, a, b in transitions(rows) if (a, b) == ("standby", "drive")]
    assert len(back_to_drive) >= 2, "the run must contain one whole cycle"
    start, end = rows[back_to_drive[0] - 1], rows[back_to_drive[1] - 1]  # both relaxed
    assert {r["state"] for r in rows[back_to_drive[0]:back_to_drive[1]]} \
        == {"drive", "standby", "charge"}

    def delta(key: str) -> float:
        return float(end[key] - start[key])

    into_cells = delta("charged_wh") - delta("discharged_wh")
    losses = delta("heat_wh") + delta("balancing_wh")
    assert delta("heat_wh") > 0.5
    assert delta("stored_wh") == pytest.approx(into_cells - losses, abs=0.01 * losses)
    # round trip: less out than in, by the losses
    efficiency = delta("discharged_wh") / delta("charged_wh")
    assert 0.9 < efficiency < 0.995
    # the charge counters agree with the truth's throughput conventions
    assert end["ah_throughput"] == pytest.approx(end["discharged_ah"] + end["charged_ah"],
                                                 abs=2e-6)
    assert end["wh_throughput"] == pytest.approx(end["discharged_wh"] + end["charged_wh"],
                                                 abs=2e-5)
    assert end["efc"] == pytest.approx(end["discharged_ah"] / 50.0, rel=1e-6)


def test_voltage_relaxes_to_ocv_after_a_rest() -> None:
    # cycling discharges to cut-off, then rests an hour; read the measured voltages back too
    sim = Simulator.from_scenario("cycling", cells=4, seed=5)
    rows: list[dict[str, Any]] = []
    sim.add_truth_sink(rows.append, 10)
    for _ in range(30):  # until the discharge has ended
        for _ in sim.batches(600):
            pass
        if any((a, b) == ("drive", "standby") for _, a, b in transitions(rows)):
            break
    cut = next(i for i, a, b in transitions(rows) if (a, b) == ("drive", "standby"))
    for _ in sim.batches(rows[cut]["t"] + 3500 - sim.time_s):
        pass
    messages = list(sim.messages(60))
    rest = rows[cut:cut + 355]
    assert all(r["state"] == "standby" for r in rest)
    gaps = np.array([np.mean(np.array(r["ocv_v"]) - np.array(r["voltage_v"])) for r in rest])
    assert gaps[0] > 0.01  # right after the load, the voltage sits well below OCV
    assert np.all(np.diff(gaps) <= 1e-9)  # and recovers monotonically
    assert abs(gaps[-1]) < 2e-4  # after ≈ 1 h, within 0.2 mV of OCV
    # the BMS's measurements (σ = 1 mV, 1 mV steps) average to the OCV too
    t_end = sim.start_time + rest[-1]["t"]
    window = [m for m in messages if t_end - 50 <= m.timestamp <= t_end]
    _, volts = read_back(window).cell_voltages(4)
    assert np.nanmean(volts) == pytest.approx(np.mean(rest[-1]["ocv_v"]), abs=5e-4)
    # and the relaxed voltage gives back the true SOC through the OCV curve
    grid = ocv_grid(CHEMISTRIES["NMC"])
    assert soc_from_ocv(grid, np.array(rest[-1]["voltage_v"])) == pytest.approx(
        rest[-1]["soc"], abs=2e-3)


def step_resistance(ambient_c: float, ea: float) -> tuple[np.ndarray, dict[str, Any]]:
    """R seen by the BMS at the first 1 C pulse edge of the pulses scenario (per cell), and the
    truth just before it."""
    overrides = merged(IDEAL_SENSORS, {
        "thermal": {"ambient_c": ambient_c, "initial_temp_c": ambient_c},
        "cell": {"activation_energy_j_mol": ea}})
    sim = Simulator.from_scenario("pulses", cells=6, seed=4, overrides=overrides)
    before = list(sim.messages(119.95))  # the pulse starts at 120 s
    truth = sim.truth()
    after = list(sim.messages(0.1))
    back = read_back(before[-200:] + after)
    _, volts = back.cell_voltages(6)
    current = back.signal("BMS_PackStatus", "PackCurrent")
    assert current[-2] == 0.0 and current[-1] == pytest.approx(50.0, abs=1e-3)
    return (volts[-2] - volts[-1]) / (current[-1] - current[-2]), truth


@pytest.mark.parametrize("ea", [17_000.0, 34_000.0])
def test_arrhenius_factor_of_the_ohmic_resistance(ea: float) -> None:
    expected = math.exp(ea / ph.GAS_CONSTANT * (1 / 273.15 - 1 / 298.15))
    assert ph.arrhenius(0.0, ea / ph.GAS_CONSTANT) == pytest.approx(expected, rel=1e-12)
    assert ph.arrhenius(25.0, ea / ph.GAS_CONSTANT) == pytest.approx(1.0, rel=1e-12)
    warm, truth = step_resistance(25.0, ea)
    cold, _ = step_resistance(0.0, ea)
    assert cold / warm == pytest.approx(np.full(6, expected), rel=0.01)
    # and at 25 °C the step shows the truth's R0 (times its SOC factor)
    soc_factor = np.array([ph.soc_factor(s, 0.5, 0.1) for s in truth["soc"]])
    assert warm == pytest.approx(np.array(truth["r0_25c_ohm"]) * soc_factor, rel=0.01)


def test_fade_schedule_is_applied() -> None:
    rows = truth_run("aging", 20_000, 600, cells=4, seed=6, overrides=SPARSE)
    a = {"fade_efc": 1.5e-4, "fade_cal": 2.0e-3, "grow_efc": 3.0e-4, "grow_cal": 4.0e-3}
    first = rows[0]
    for r in rows:
        assert r["aging_efc"] == pytest.approx(100.0 * r["efc"], rel=1e-6, abs=1e-6)
        assert r["aging_days"] == pytest.approx(100.0 * r["t"] / 86400, rel=1e-6)
        fade = a["fade_efc"] * r["aging_efc"] + a["fade_cal"] * math.sqrt(r["aging_days"])
        growth = 1 + a["grow_efc"] * r["aging_efc"] + a["grow_cal"] * math.sqrt(r["aging_days"])
        assert np.array(r["capacity_ah"]) / np.array(first["capacity_ah"]) == pytest.approx(
            np.full(4, 1 - fade), rel=1e-5)
        assert np.array(r["r0_25c_ohm"]) / np.array(first["r0_25c_ohm"]) == pytest.approx(
            np.full(4, growth), rel=1e-5)
    caps = np.array([np.mean(r["capacity_ah"]) for r in rows])
    assert np.all(np.diff(caps) < 0)
    assert caps[-1] / caps[0] < 0.97  # ≥ 3 % fade in two accelerated cycles
    # the fade shows in what a full discharge delivers: the second gives less than the first
    ends = [i for i, a_, b in transitions(rows) if (a_, b) == ("drive", "standby")]
    starts = [i for i, a_, b in transitions(rows) if b == "drive"]
    delivered = [rows[e]["discharged_ah"] - rows[s - 1]["discharged_ah"]
                 for s, e in zip([1, *starts], ends, strict=False)]
    assert len(delivered) >= 2 and delivered[1] < delivered[0]


def test_cell_to_cell_spread_defaults() -> None:
    sim = Simulator.from_scenario("nominal", cells=256, seed=9)
    truth = sim.truth()
    cap = np.array(truth["capacity_ah"])
    r0 = np.array(truth["r0_25c_ohm"])
    assert np.all(np.abs(cap / 50.0 - 1) <= 0.02)
    assert np.all(np.abs(r0 / (0.05 / 50.0) - 1) <= 0.05)
    assert np.std(cap / 50.0) > 0.008 and np.std(r0 / 0.001) > 0.02  # uniform ±2 %, ±5 %


def test_leaky_cell_self_discharges() -> None:
    overrides = merged(SPARSE, {
        "cell": {"leaky_cells": [{"cell": 1, "current_a": 0.5}]},
        "balancing": {"enabled": False},
        "schedule": {"segment": [{"kind": "rest", "duration_s": 7200.0}]}})
    rows = truth_run("nominal", 3600, 3600, cells=3, seed=1, overrides=overrides)
    start, end = rows[0], rows[-1]
    drop = np.array(start["soc"]) - np.array(end["soc"])
    assert drop[0] == 0.0 and drop[2] == 0.0
    assert drop[1] == pytest.approx(0.5 / end["capacity_ah"][1], rel=0.01)
    assert end["ah_throughput"] == 0.0  # the leak never reaches the pack terminals


def test_passive_balancing_bleeds_the_high_cells() -> None:
    overrides = {"pack": {"initial_soc": 0.95, "initial_soc_spread": 0.03},
                 "balancing": {"current_a": 1.0},
                 "schedule": {"segment": [{"kind": "rest", "duration_s": 7200.0}]}}
    sim = Simulator.from_scenario("nominal", cells=8, seed=3, overrides=overrides)
    first = sim.truth()
    messages = list(sim.messages(1800))
    last = sim.truth()
    volts = np.array(first["voltage_v"])
    expected = ((volts - volts.min() > 0.010) & (volts > 3.9)).astype(int)
    assert first["balancing"] == expected.tolist() and 0 < expected.sum() < 8
    # the frames carry the same switches
    flags = read_back(messages[:200]).signal("BMS_Balancing", "BalancingFlags")
    assert int(flags[0]) == sum(bit << i for i, bit in enumerate(first["balancing"]))
    # the highest cell bleeds 1 A all along: 0.5 Ah of 50 Ah in 30 min, the lowest none
    drop = np.array(first["soc"]) - np.array(last["soc"])
    assert drop[np.argmax(first["soc"])] == pytest.approx(0.01, rel=0.03)
    assert drop[np.argmin(first["soc"])] == 0.0
    assert np.ptp(last["soc"]) < np.ptp(first["soc"]) - 0.009
    assert last["balancing_wh"] > 0 and last["ah_throughput"] == 0.0


def test_thermal_model_heats_under_load_and_cools_at_the_ends() -> None:
    overrides = merged(SPARSE, {
        "thermal": {"ambient_c": 20.0, "ambient_daily_swing_c": 0.0},
        "schedule": {"repeat": False, "segment": [
            {"kind": "constant", "c_rate": 2.0, "duration_s": 1200.0},
            {"kind": "rest", "duration_s": 7200.0}]}})
    rows = truth_run("nominal", 5000, 100, cells=10, seed=1, overrides=overrides)
    loaded = rows[12]  # t = 1200 s, end of the 2 C discharge
    temps = np.array(loaded["temp_c"])
    assert np.all(temps > 24.0)
    assert temps[0] < temps[5] and temps[-1] < temps[5]  # end cells lose heat faster
    rested = np.array(rows[-1]["temp_c"])
    assert np.all(rested < temps) and np.all(rested > 20.0)
    assert np.max(rested) - 20.0 < 0.3 * (np.max(temps) - 20.0)


def test_cc_cv_charge_holds_the_voltage_and_tapers() -> None:
    overrides = merged(SPARSE, {"pack": {"initial_soc": 0.5}, "schedule": {
        "repeat": False, "segment": [{"kind": "charge", "c_rate": 1.0, "taper_c": 0.05}]}})
    sim = Simulator.from_scenario("cycling", cells=4, seed=7, overrides=overrides)
    rows: list[dict[str, Any]] = []
    sim.add_truth_sink(rows.append, 10)
    messages = list(sim.messages(5400))
    charging = [r for r in rows if r["state"] == "charge"]
    vmax = np.array([max(r["voltage_v"]) for r in charging])
    current = np.array([r["current_a"] for r in charging])
    assert np.all(vmax <= 4.2 + 2e-3)
    assert current[0] == pytest.approx(-50.0)
    cv = current > -49.9
    assert cv.sum() > 10 and np.all(np.diff(current[cv]) >= -1e-9)  # tapering towards zero
    assert current[-1] > -50 * 0.05 - 0.5
    after = rows[len(charging) + 1]
    assert after["state"] == "standby" and min(after["soc"]) > 0.97
    # the firmware's own SOC is reset to 100 % when the charge completes
    soc_bms = read_back(messages).signal("BMS_PackStatus", "StateOfCharge")
    # (and afterwards drifts with the current sensor's offset, as coulomb counting does)
    full = int(np.argmax(soc_bms))
    assert soc_bms[full] == pytest.approx(100.0, abs=0.05)
    assert soc_bms[full - 1] < 99.0 and 99.0 < soc_bms[-1] < soc_bms[full]


def test_protection_trips_opens_the_contactors_and_recovers() -> None:
    overrides = merged(SPARSE, {"pack": {"initial_soc": 0.08}, "schedule": {
        "repeat": False, "segment": [
            {"kind": "constant", "c_rate": 2.0, "duration_s": 3600.0},
            {"kind": "rest", "duration_s": 600.0}]}})
    sim = Simulator.from_scenario("nominal", cells=4, seed=1, overrides=overrides)
    rows: list[dict[str, Any]] = []
    sim.add_truth_sink(rows.append, 0.1)  # every physics step
    messages = list(sim.messages(900))
    tripped = next(i for i, r in enumerate(rows) if r["state"] == "fault")
    assert min(rows[tripped]["voltage_v"]) < 2.8 and rows[tripped]["current_a"] == 100.0
    assert rows[tripped]["fault_flags"] & ph.FLAG_UNDERVOLTAGE
    held = [r for r in rows[tripped + 1:] if r["state"] == "fault"]
    assert len(held) >= 100 and all(r["current_a"] == 0.0 for r in held)  # ≥ hold_s, open
    assert rows[-1]["state"] == "standby" and rows[-1]["fault_flags"] == 0
    back = read_back(messages)
    states = back.signal("BMS_PackStatus", "PackState")
    flags = back.signal("BMS_PackStatus", "FaultFlags").astype(int)
    assert np.any(states == ph.FAULT) and np.any(flags & ph.FLAG_UNDERVOLTAGE)


def test_lfp_chemistry() -> None:
    grid = ocv_grid(CHEMISTRIES["LFP"])
    assert np.all(np.diff(grid) > 0)
    assert ocv_lookup(grid, 0.5) == pytest.approx(3.303, abs=1e-3)
    rows = truth_run("cycling", 9000, 60, cells=4, seed=1, chemistry="LFP", overrides=SPARSE)
    volts = np.array([v for r in rows for v in r["voltage_v"]])
    assert volts.min() > 2.5 and volts.max() < 3.7
    cut = next(i for i, a, b in transitions(rows) if (a, b) == ("drive", "standby"))
    assert min(rows[cut - 1]["voltage_v"]) > 2.8  # stopped at the LFP cut-off, 2.8 V
    assert np.mean(rows[cut]["soc"]) < 0.1
