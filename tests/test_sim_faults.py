"""Each injected fault appears on the bus as specified, and only where specified. A faulty run is
compared with the same seed's clean run: every random stream is separate, so whatever differs is
the fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import can
import numpy as np
import pytest

from firmware_sim import Simulator
from firmware_sim import physics as ph
from firmware_sim.frames import CAN_ERR_BUSERROR, CAN_ERR_BUSOFF
from firmware_sim.readback import read_back
from firmware_sim.traces import TraceWriter

START = 1_767_225_600.0
CELLS = 6


def run(faults: list[dict[str, Any]], seconds: float = 20.0, **extra: Any) -> list[can.Message]:
    """The pulses scenario (its first pulse starts at 120 s), from 110 s on."""
    sim = Simulator.from_scenario("pulses", cells=CELLS, sensors=2, seed=11,
                                  overrides={"fault": faults, **extra})
    for _ in sim.batches(110.0):
        pass
    return list(sim.messages(seconds))


def frames_of(messages: list[can.Message], base: int) -> list[can.Message]:
    return [m for m in messages if not m.is_error_frame and m.arbitration_id & ~0xF == base]


def key(m: can.Message) -> tuple[float, int, bytes, int, bool]:
    return (m.timestamp, m.arbitration_id, bytes(m.data), m.dlc, m.is_error_frame)


@pytest.fixture(scope="module")
def clean() -> list[can.Message]:
    """The same run without faults."""
    return run([])


def test_stuck_cell_sensor_freezes_the_reported_value(clean: list[can.Message]) -> None:
    messages = run([{"kind": "stuck_cell", "cell": 4, "start_s": 115.0, "duration_s": 10.0}])
    times, volts = read_back(messages).cell_voltages(CELLS)
    _, clean = read_back(clean).cell_voltages(CELLS)
    t = times - START
    inside = (t >= 115.0) & (t < 125.0)
    assert len(set(volts[inside, 4].tolist())) == 1  # frozen, through the 1 C pulse at 120 s
    assert volts[inside, 4][0] == clean[inside, 4][0]  # at its value when the fault began
    assert np.ptp(clean[inside, 4]) > 0.03
    assert np.array_equal(volts[~inside], clean[~inside])  # nothing else changes
    assert np.array_equal(volts[:, [0, 1, 2, 3, 5]], clean[:, [0, 1, 2, 3, 5]])
    flags = read_back(messages).signal("BMS_PackStatus", "FaultFlags").astype(int)
    assert not np.any(flags & ph.FLAG_SENSOR)  # unnoticed unless flagged


def test_flagged_stuck_cell_is_reported_invalid() -> None:
    messages = run([{"kind": "stuck_cell", "cell": 4, "start_s": 115.0, "flagged": True}])
    back = read_back(messages)
    times, volts = back.cell_voltages(CELLS)
    inside = times - START >= 115.0
    assert np.all(np.isnan(volts[inside, 4])) and not np.any(np.isnan(volts[~inside]))
    status_t = back.times("BMS_PackStatus") - START
    flags = back.signal("BMS_PackStatus", "FaultFlags").astype(int)
    assert np.all((flags & ph.FLAG_SENSOR > 0) == (status_t >= 115.0))


def test_dropped_frames_only_of_the_chosen_kind(clean: list[can.Message]) -> None:
    messages = run([{"kind": "dropped_frames", "probability": 0.3,
                     "messages": ["BMS_PackStatus"], "start_s": 115.0, "duration_s": 10.0}])
    clean_status = frames_of(clean, 0x500)
    status = frames_of(messages, 0x500)
    assert {key(m) for m in status} < {key(m) for m in clean_status}
    lost = [m for m in clean_status if key(m) not in {key(x) for x in status}]
    assert all(115.0 <= m.timestamp - START < 125.0 for m in lost)
    assert 15 <= len(lost) <= 45  # 30 % of 100 frames
    others = [m for m in messages if m.arbitration_id != 0x500]
    assert [key(m) for m in others] == [key(m) for m in clean if m.arbitration_id != 0x500]
    # the rolling counter shows the gaps
    counter = read_back(status).signal("BMS_PackStatus", "StatusCounter").astype(int)
    assert np.any(np.diff(counter) % 8 != 1)


@pytest.mark.parametrize("mode", ["bitflip", "random", "truncate"])
def test_corrupted_payloads(mode: str, clean: list[can.Message]) -> None:
    messages = run([{"kind": "corrupted_payload", "probability": 0.2, "mode": mode,
                     "messages": ["BMS_CellVoltages"]}])
    assert [(m.timestamp, m.arbitration_id) for m in messages] == \
        [(m.timestamp, m.arbitration_id) for m in clean]
    changed = [(a, b) for a, b in zip(clean, messages, strict=True) if key(a) != key(b)]
    assert {b.arbitration_id for _, b in changed} == {0x520}
    cell_frames = len(frames_of(clean, 0x520))
    assert 0.12 * cell_frames < len(changed) < 0.28 * cell_frames
    for a, b in changed:
        if mode == "bitflip":
            flipped = int.from_bytes(a.data, "little") ^ int.from_bytes(b.data, "little")
            assert bin(flipped).count("1") == 1
        elif mode == "truncate":
            assert b.dlc < 8 and bytes(b.data) == bytes(a.data)[:b.dlc]
        else:
            assert b.dlc == 8
    if mode == "truncate":
        assert len(read_back(messages).undecodable) == len(changed)


def test_error_frames_at_the_given_rate_in_the_window(tmp_path: Path,
                                                     clean: list[can.Message]) -> None:
    messages = run([{"kind": "error_frames", "rate_hz": 5.0, "start_s": 112.0,
                     "duration_s": 12.0}])
    errors = [m for m in messages if m.is_error_frame]
    assert 30 <= len(errors) <= 95  # Poisson, mean 60
    assert all(112.0 <= m.timestamp - START < 124.0 for m in errors)
    assert all(m.arbitration_id & CAN_ERR_BUSERROR for m in errors)
    assert [key(m) for m in messages if not m.is_error_frame] == [key(m) for m in clean]
    # and a candump trace keeps them as error frames for python-can
    path = tmp_path / "errors.log"
    sim = Simulator.from_scenario("pulses", cells=CELLS, sensors=2, seed=11, overrides={
        "fault": [{"kind": "error_frames", "rate_hz": 5.0, "start_s": 0.0, "duration_s": 12.0}]})
    with TraceWriter(path) as writer:
        for batch in sim.batches(20.0):
            writer.write(batch)
    assert 30 <= sum(m.is_error_frame for m in can.LogReader(path)) <= 95


def test_bus_off_silences_the_bms_for_the_period(clean: list[can.Message]) -> None:
    messages = run([{"kind": "bus_off", "start_s": 114.0, "duration_s": 3.0}])
    errors = [m for m in messages if m.is_error_frame]
    assert len(errors) == 1 and errors[0].arbitration_id & CAN_ERR_BUSOFF
    assert errors[0].timestamp - START == pytest.approx(114.0)
    frames = [m for m in messages if not m.is_error_frame]
    assert not any(114.0 <= m.timestamp - START < 117.0 for m in frames)
    assert [key(m) for m in frames] == [key(m) for m in clean
                                        if not 114.0 <= m.timestamp - START < 117.0]


def test_second_pack_with_a_duplicate_serial(clean: list[can.Message]) -> None:
    messages = run([{"kind": "duplicate_serial", "start_s": 115.0, "duration_s": 5.0}])
    back = read_back(messages)
    assert back.serial(0) == back.serial(1) == "SIM-0001"
    twin = [m for m in messages if m.arbitration_id & 0xF == 1]
    assert twin and all(115.0 <= m.timestamp - START < 120.1 for m in twin)
    assert [key(m) for m in messages if m.arbitration_id & 0xF == 0] == [key(m) for m in clean]
    # its own physics: same design, different cells
    _, mine = back.cell_voltages(CELLS, node_id=0)
    _, other = back.cell_voltages(CELLS, node_id=1)
    assert not np.array_equal(mine[-1], other[-1])
    stamps = [m.timestamp for m in messages]
    assert stamps == sorted(stamps)


def test_out_of_range_values() -> None:
    messages = run([
        {"kind": "out_of_range", "signal": "cell_voltage", "index": 2, "value": 6.5535,
         "start_s": 115.0, "duration_s": 1.0},
        {"kind": "out_of_range", "signal": "cell_temp", "index": 1, "value": -40.0,
         "start_s": 115.0, "duration_s": 1.0},
        {"kind": "out_of_range", "signal": "current", "value": 9000.0, "start_s": 116.0,
         "duration_s": 1.0},
        {"kind": "out_of_range", "signal": "pack_voltage", "value": 0.0, "start_s": 116.0,
         "duration_s": 1.0},
    ])
    back = read_back(messages)
    times, volts = back.cell_voltages(CELLS)
    inside = (times - START >= 115.0) & (times - START < 116.0)
    assert np.allclose(volts[inside, 2], 6.5535) and np.all(volts[~inside, 2] < 4.3)
    stats_t = back.times("BMS_CellStats") - START
    max_v = back.signal("BMS_CellStats", "MaxCellVoltage")
    assert np.all(np.isclose(max_v, 6.5535) == ((stats_t >= 115.0) & (stats_t < 116.0)))
    temps_t = back.times("BMS_CellTemperatures") - START
    temp1 = back.signal("BMS_CellTemperatures", "CellTemp1")
    assert temp1[(temps_t >= 115.0) & (temps_t < 116.0)].tolist() == [-40.0]
    assert np.all(temp1[(temps_t < 115.0) | (temps_t >= 116.0)] > 0.0)
    status_t = back.times("BMS_PackStatus") - START
    current = back.signal("BMS_PackStatus", "PackCurrent")
    pack_v = back.signal("BMS_PackStatus", "PackVoltage")
    window = (status_t >= 116.0) & (status_t < 117.0)
    assert np.allclose(current[window], 8388.607)  # clipped to what the field carries
    assert np.all(pack_v[window] == 0.0) and np.all(pack_v[~window] > 20.0)
