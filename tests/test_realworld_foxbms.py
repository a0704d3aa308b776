"""A real foxBMS 2 trace (PCAN TRC, 9 frames) through foxBMS's own DBC and our foxbms2 profile.

Expected values come from outside the profile code: two cells worked out by hand from the trace's
bytes, and every cell and sensor from cantools decoding the same frames directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import can
import numpy as np
import pytest

from gateway.decode.assembler import PackAssembler
from gateway.decode.profile import Profile, load_profile
from gateway.metrics import Metrics
from gateway.model import Frame, Sample
from gateway.sources.base import frame_from_message


@pytest.fixture(scope="module")
def profile(repo: Path, realworld: Path) -> Profile:
    return load_profile(repo / "profiles" / "foxbms2.toml",
                        dbc_override=realworld / "foxbms" / "foxbms.dbc")


@pytest.fixture(scope="module")
def frames(realworld: Path) -> list[Frame]:
    with can.LogReader(realworld / "foxbms" / "can-log.trc") as reader:
        return [frame_from_message(m) for m in reader]


@pytest.fixture(scope="module")
def run(profile: Profile, frames: list[Frame]) -> tuple[list[Sample], list[Sample], Metrics]:
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics, configured_serial="FOX-BENCH-1")
    during = [s for f in frames for s in assembler.feed(f)]
    return during, assembler.flush(math.inf), metrics


def test_trace_is_what_we_expect(frames: list[Frame]) -> None:
    assert len(frames) == 9
    assert [f.can_id for f in frames] == [0x243, 0x241, 0x220, 0x250, 0x244, 0x260, 0x232,
                                          0x231, 0x243]


def test_partial_cycle_comes_out_at_the_end_of_input(
        run: tuple[list[Sample], list[Sample], Metrics], frames: list[Frame]) -> None:
    during, flushed, metrics = run
    # 4 of 216 cells arrived: no cycle completed while reading; flush emits what there is
    assert during == []
    (sample,) = flushed
    assert sample.serial == "FOX-BENCH-1"
    cell_frame = next(f for f in frames if f.can_id == 0x250)
    assert sample.ts == cell_frame.ts
    assert metrics.get("samples_emitted_total") == 1


def test_two_cells_by_hand(run: tuple[list[Sample], list[Sample], Metrics],
                           frames: list[Frame]) -> None:
    data = next(f for f in frames if f.can_id == 0x250).data
    assert data[0] == 2  # multiplexer 2: cells 8..11
    # CellVoltage_008: Motorola, start bit 11, 13 bits: byte 1 bits 3..0, byte 2, byte 3 bit 7
    cell_8 = ((data[1] & 0x0F) << 9) | (data[2] << 1) | (data[3] >> 7)
    # CellVoltage_009: Motorola, start bit 30, 13 bits: byte 3 bits 6..0, byte 4 bits 7..2
    cell_9 = ((data[3] & 0x7F) << 6) | (data[4] >> 2)
    assert (cell_8, cell_9) == (1996, 2005)  # mV
    (sample,) = run[1]
    assert sample.cell_voltages_v is not None
    assert sample.cell_voltages_v[8] == pytest.approx(cell_8 / 1000)
    assert sample.cell_voltages_v[9] == pytest.approx(cell_9 / 1000)


def test_all_cells_and_sensors_match_cantools(
        run: tuple[list[Sample], list[Sample], Metrics], frames: list[Frame],
        profile: Profile) -> None:
    db = profile.database
    voltages: dict[int, float] = {}
    temps: dict[int, float] = {}
    for frame in frames:
        message = db.get_message_by_frame_id(frame.can_id)
        decoded = message.decode(frame.data, decode_choices=False)
        for name, value in decoded.items():
            if name.startswith("CellVoltage_") and not name.endswith("invalidFlag"):
                assert decoded[f"{name}_invalidFlag"] == 0
                voltages[int(name.split("_")[1])] = value / 1000
            if name.startswith("CellTemperature_") and not name.endswith("invalidFlag"):
                assert decoded[f"{name}_invalidFlag"] == 0
                temps[int(name.split("_")[1])] = value
    assert sorted(voltages) == [8, 9, 10, 11] and sorted(temps) == list(range(6, 12))
    (sample,) = run[1]
    assert sample.cell_voltages_v is not None and sample.cell_voltage_valid is not None
    assert sample.cell_temps_c is not None and sample.cell_temp_valid is not None
    assert len(sample.cell_voltages_v) == 216 and len(sample.cell_temps_c) == 180
    assert np.flatnonzero(sample.cell_voltage_valid).tolist() == sorted(voltages)
    assert np.flatnonzero(sample.cell_temp_valid).tolist() == sorted(temps)
    for cell, volts in voltages.items():
        assert sample.cell_voltages_v[cell] == pytest.approx(volts)
    for sensor, celsius in temps.items():
        assert sample.cell_temps_c[sensor] == pytest.approx(celsius)
    assert np.isnan(sample.cell_voltages_v[~sample.cell_voltage_valid]).all()
    not_received = (216 - 4) + (180 - 6)
    assert run[2].get("values_masked_total", "not_received") == not_received


def test_pack_values_state_and_faults_match_cantools(
        run: tuple[list[Sample], list[Sample], Metrics], frames: list[Frame],
        profile: Profile) -> None:
    db = profile.database
    state = db.decode_message(0x220, next(f for f in frames if f.can_id == 0x220).data)
    minmax = db.decode_message(0x231, next(f for f in frames if f.can_id == 0x231).data)
    (sample,) = run[1]
    assert sample.state == str(state["BmsState"]) == "ERROR"
    fault_names = ["GeneralError", "EmergencyShutoff", "InsulationError",
                   "PackOvercurrentChargeError", "PackOvercurrentDischargeError",
                   "MainFuseBlown", "SystemMonitoringError", "PrechargeVoltageError",
                   "PrechargeCurrentError", "McuDieTemperatureError",
                   "BmsMasterPcbOvertemperatureError", "BmsMasterPcbUndertemperatureErro",
                   "CanTimingError", "NvramCrcError"]
    raw = db.decode_message(0x220, next(f for f in frames if f.can_id == 0x220).data,
                            decode_choices=False)
    expected = sum(1 << bit for bit, name in enumerate(fault_names) if raw[name])
    assert sample.fault_flags == expected and expected != 0
    assert sample.min_cell_voltage_v == pytest.approx(minmax["MinimumCellVoltage"] / 1000)
    assert sample.max_cell_voltage_v == pytest.approx(minmax["MaximumCellVoltage"] / 1000)
    # f_PackValuesP0 and the pack temperature extremes are not in this trace: absent, not zero
    assert math.isnan(sample.current_a) and math.isnan(sample.pack_voltage_v)
    assert math.isnan(sample.min_cell_temp_c)


def test_every_frame_is_accounted(run: tuple[list[Sample], list[Sample], Metrics],
                                  frames: list[Frame]) -> None:
    metrics = run[2]
    decoded = metrics.get("frames_decoded_total")
    ignored = metrics.get("frames_ignored_total")
    assert metrics.get("frames_rejected_total") == 0
    # 0x220, 0x250, 0x260 and 0x231 are used; the string and limit messages are not
    assert (decoded, ignored) == (4, 5)
    assert decoded + ignored == len(frames)
