"""Scenario files: the shipped ones load and behave as their names say; mistakes are errors that
name the file and the dotted key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_sim import Scenario, ScenarioError, Simulator, load_scenario, shipped_scenarios
from firmware_sim.readback import read_back
from firmware_sim.scenario import ChargeSegment, DriveSegment, PulsesSegment


def test_the_four_scenarios_are_shipped_and_speak() -> None:
    assert {"nominal", "pulses", "cycling", "aging"} <= set(shipped_scenarios())
    for name in shipped_scenarios():
        scenario = load_scenario(name)
        assert scenario.name == name and scenario.schedule.repeat
        back = read_back(Simulator.from_scenario(name, cells=5, seed=1).messages(2.0))
        assert back.serial() == "SIM-0001" and not back.undecodable
        assert back.of("BMS_Info")[0].signals["CellCount"] == 5


def test_shipped_scenarios_have_what_their_names_promise() -> None:
    pulses = load_scenario("pulses").schedule.segment
    steps = [c for seg in pulses if isinstance(seg, PulsesSegment) for c in seg.c_rates]
    assert steps and min(abs(c) for c in steps) >= 0.2
    assert any(isinstance(seg, ChargeSegment) for seg in load_scenario("cycling").schedule.segment)
    assert load_scenario("aging").aging.acceleration > 1
    nominal = load_scenario("nominal").schedule.segment
    assert any(isinstance(seg, DriveSegment) for seg in nominal)


def test_pulse_train_currents(tmp_path: Path) -> None:
    sim = Simulator.from_scenario("pulses", cells=3, seed=1)
    rows: list[dict[str, Any]] = []
    sim.add_truth_sink(rows.append, 1.0)
    for _ in sim.batches(900):
        pass
    levels = {round(r["current_a"], 6) for r in rows}
    assert levels == {0.0, 50.0, -25.0, 25.0, 10.0, -10.0}  # 1, −0.5, 0.5, 0.2, −0.2 C of 50 Ah
    first = next(r["t"] for r in rows if r["current_a"] != 0)
    assert first == 120.0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "key"), [
    ('[pack]\ncells = 0\n', "pack.cells"),
    ('[pack]\ncells = "many"\n', "pack.cells"),
    ('[pack]\nchemistry = "LTO"\n', "pack.chemistry"),
    ('[pack]\nserial = "HAS SPACE"\n', "pack.serial"),
    ('[sensors]\nnoise = 1.0\n', "sensors.noise"),
    ('[protocol]\ncell_voltages_period_s = 0.15\n', "protocol.cell_voltages_period_s"),
    ('[[schedule.segment]]\nkind = "walk"\n', "schedule.segment[0].kind"),
    ('[[schedule.segment]]\nkind = "constant"\nc_rate = 1.0\n', "schedule.segment[0]"),
    ('[[schedule.segment]]\nkind = "charge"\nc_rate = -1.0\n', "schedule.segment[0].c_rate"),
    ('[[fault]]\nkind = "stuck_cell"\ncell = 99\n', "fault[0].cell"),
    ('[[fault]]\nkind = "dropped_frames"\nmessages = ["BMS_Nope"]\n', "fault[0].messages"),
    ('[[fault]]\nkind = "duplicate_serial"\nnode_id = 0\n', "fault[0].node_id"),
    ('[cell]\nleaky_cells = [{cell = 20, current_a = 0.1}]\n', "cell.leaky_cells[0].cell"),
])
def test_mistakes_name_the_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert str(path) in str(caught.value) and f"'{key}'" in str(caught.value)


def test_not_toml_and_not_found(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"s\.toml"):
        load_scenario(write(tmp_path, "[pack\n"))
    with pytest.raises(ScenarioError, match=r"no scenario named 'nope'.*nominal"):
        load_scenario("nope")


def test_base_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[scenario]\nbase = "pulses"\ndescription = "mine"\n'
                           '[pack]\ncells = 7\n[[fault]]\nkind = "bus_off"\n')
    mine = load_scenario(path)
    pulses = load_scenario("pulses")
    assert mine.name == "s" and mine.description == "mine"
    assert mine.pack.cells == 7 and mine.pack.initial_soc == pulses.pack.initial_soc
    assert mine.schedule == pulses.schedule and len(mine.fault) == 1
    again = load_scenario(path, {"pack": {"cells": 9}, "thermal": {"ambient_c": 5.0}})
    assert again.pack.cells == 9 and again.thermal.ambient_c == 5.0
    sim = Simulator.from_scenario(path, cells=3, serial="OTHER", rated_capacity_ah=20.0)
    assert sim.scenario.pack.cells == 3 and sim.packs[0].serial == "OTHER"
    assert sim.truth()["capacity_ah"] == pytest.approx(np.full(3, 20.0), rel=0.021)


def test_a_loaded_scenario_is_used_as_it_is() -> None:
    scenario = load_scenario("cycling", {"pack": {"cells": 2}})
    assert isinstance(scenario, Scenario)
    sim = Simulator.from_scenario(scenario)
    assert len(sim.truth()["soc"]) == 2


def test_a_schedule_that_cannot_progress_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, '[pack]\ninitial_soc = 1.0\ninitial_soc_spread = 0.0\n'
                           '[[schedule.segment]]\nkind = "charge"\n'
                           '[[schedule.segment]]\nkind = "constant"\nc_rate = 1.0\n'
                           'until_soc_above = 0.5\n')
    sim = Simulator.from_scenario(path)
    with pytest.raises(ScenarioError, match="no progress"):
        list(sim.batches(10.0))
