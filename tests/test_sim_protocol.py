"""The simulator speaks the reference protocol: encoder against cantools, periods and layout,
round trip through the DBC, trace files read back by python-can, determinism, the command."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import can
import numpy as np
import pytest

from firmware_sim import DEFAULT_START_TIME, Simulator
from firmware_sim.protocol import BASE_IDS, Protocol
from firmware_sim.readback import read_back
from firmware_sim.traces import TraceWriter, candump_bytes, read_truth

REPO = Path(__file__).resolve().parent.parent
IDEAL = {"sensors": {"voltage_noise_v": 0.0, "voltage_lsb_v": 0.0, "pack_voltage_noise_v": 0.0,
                     "current_noise_a": 0.0, "current_offset_fs": 0.0,
                     "current_gain_error": 0.0, "current_lsb_a": 0.0, "temp_noise_c": 0.0,
                     "temp_lsb_c": 0.0}}
FAULTY = {"fault": [
    {"kind": "error_frames", "rate_hz": 2.0},
    {"kind": "corrupted_payload", "probability": 0.05, "mode": "truncate"},
    {"kind": "bus_off", "start_s": 4.0, "duration_s": 1.5},
    {"kind": "duplicate_serial", "start_s": 2.0},
]}


def test_vectorised_encoder_equals_cantools() -> None:
    proto = Protocol()
    rng = np.random.default_rng(0)
    for name, codec in proto.messages.items():
        message = proto.db.get_message_by_name(name)
        values: dict[str, Any] = {}
        for sig in message.signals:
            lo, hi = codec.signals[sig.name].raw_min, codec.signals[sig.name].raw_max
            raw = rng.integers(lo, hi, 300, endpoint=True)
            raw[:2] = (lo, hi)
            # physical values half a step off the raw grid would round either way; stay clear
            values[sig.name] = raw if sig.scale == 1 and sig.offset == 0 else \
                (raw + rng.uniform(-0.4, 0.4, 300)) * sig.scale + sig.offset
        ours = proto.messages[name].pack(300, **values)
        for i in range(300):
            one = {k: (int(v[i]) if v.dtype.kind == "i" else float(v[i]))
                   for k, v in values.items()}
            theirs = message.encode(one, strict=False)
            assert int(ours[i]).to_bytes(8, "little") == theirs, (name, one)


def test_periods_layout_and_node_id() -> None:
    serial = "PACK-2026-0001234-X"  # 19 characters: three identity chunks
    sim = Simulator.from_scenario("nominal", cells=20, sensors=8, serial=serial, node_id=3)
    messages = list(sim.messages(10.0))
    counts = Counter(m.arbitration_id for m in messages)
    assert counts == {0x503: 100, 0x513: 100, 0x523: 100 * 7, 0x533: 10 * 2, 0x543: 10,
                      0x553: 10 * 3, 0x563: 10}
    stamps = [m.timestamp for m in messages]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert stamps[0] == DEFAULT_START_TIME and stamps[-1] < DEFAULT_START_TIME + 10
    back = read_back(messages)
    blocks = back.signal("BMS_CellVoltages", "CellVoltageBlock", node_id=3).astype(int)
    assert blocks.tolist() == list(range(7)) * 100  # every 100 ms, whole, block 0 first
    times = back.times("BMS_CellVoltages", node_id=3).reshape(100, 7)
    assert np.allclose(np.diff(times[:, 0]), 0.1)
    assert np.all(times[:, -1] - times[:, 0] < 0.01)  # one burst
    assert back.serial(node_id=3) == serial
    info = back.of("BMS_Info", node_id=3)[-1].signals
    assert info == {"CellCount": 20, "SensorCount": 8, "RatedCapacity": 50.0, "Chemistry": 0,
                    "ProtocolVersion": 1}
    counter = back.signal("BMS_PackStatus", "StatusCounter", node_id=3).astype(int)
    assert np.all(np.diff(counter) % 8 == 1)
    invalid = back.signal("BMS_CellVoltages", "CellVoltageInvalid", node_id=3).astype(int)
    assert set(invalid[blocks == 6].tolist()) == {0b100}  # cell 20 does not exist
    assert set(invalid[blocks < 6].tolist()) == {0}
    temp_invalid = back.signal("BMS_CellTemperatures", "CellTempInvalid", node_id=3)
    assert set(temp_invalid.astype(int).tolist()) == {0, 0b111100}  # sensors 8..11 absent


def test_round_trip_through_the_dbc_matches_the_truth() -> None:
    sim = Simulator.from_scenario("nominal", cells=16, sensors=4, seed=2, overrides=IDEAL)
    messages = list(sim.messages(600.0))  # the morning drive is under way
    truth = sim.truth()  # of the last frame's step: the last burst
    back = read_back(messages)
    _, volts = back.cell_voltages(16)
    assert volts[-1] == pytest.approx(np.round(truth["voltage_v"], 4), abs=1.01e-4)
    status = back.of("BMS_PackStatus")[-1].signals
    assert status["PackCurrent"] == pytest.approx(truth["current_a"], abs=1.01e-3)
    assert status["PackVoltage"] == pytest.approx(truth["pack_voltage_v"], abs=0.0101)
    assert status["PackState"] == 1  # drive
    # positive while discharging: over the drive the pack's charge went down
    currents = back.signal("BMS_PackStatus", "PackCurrent")
    assert currents.mean() > 0 and truth["discharged_ah"] > truth["charged_ah"]
    temps = np.array([back.of("BMS_CellTemperatures")[-1].signals[f"CellTemp{j}"]
                      for j in range(4)])
    under_sensors = np.array(truth["temp_c"])[[2, 6, 10, 14]]
    assert temps == pytest.approx(np.round(under_sensors * 2) / 2, abs=0.51)
    stats = back.of("BMS_CellStats")[-1].signals
    assert stats["MinCellVoltage"] == pytest.approx(np.nanmin(volts[-1]), abs=1e-9)
    assert stats["MaxCellVoltageIndex"] == int(np.nanargmax(volts[-1]))


def test_candump_log_reads_back_with_python_can(tmp_path: Path) -> None:
    # error frames, truncated payloads and a second pack exercise the writer's slow path
    path = tmp_path / "sim.log"
    with TraceWriter(path) as writer:
        for batch in Simulator.from_scenario("pulses", cells=8, seed=3,
                                             overrides=FAULTY).batches(8.0):
            writer.write(batch)
    expected = list(Simulator.from_scenario("pulses", cells=8, seed=3,
                                            overrides=FAULTY).messages(8.0))
    got = list(can.LogReader(path))
    assert len(got) == len(expected) == writer.frames
    assert any(m.is_error_frame for m in got) and any(m.dlc < 8 for m in got)
    for ours, theirs in zip(expected, got, strict=True):
        assert theirs.timestamp == pytest.approx(ours.timestamp, abs=1e-7)
        assert theirs.is_error_frame == ours.is_error_frame
        if not ours.is_error_frame:
            assert (theirs.arbitration_id, theirs.dlc, bytes(theirs.data)) == \
                (ours.arbitration_id, ours.dlc, bytes(ours.data))
    first = path.read_text().splitlines()[0]
    assert first == "(1767225600.000000) can0 500#" + bytes(expected[0].data).hex().upper()


@pytest.mark.parametrize("suffix", [".asc", ".blf"])
def test_asc_and_blf_traces(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"sim{suffix}"
    with TraceWriter(path) as writer:
        for batch in Simulator.from_scenario("nominal", cells=6, seed=1).batches(3.0):
            writer.write(batch)
    expected = list(Simulator.from_scenario("nominal", cells=6, seed=1).messages(3.0))
    got = list(can.LogReader(path))
    assert [(m.arbitration_id, bytes(m.data)) for m in got] == \
        [(m.arbitration_id, bytes(m.data)) for m in expected]
    gaps = np.diff([m.timestamp for m in got])
    assert gaps == pytest.approx(np.diff([m.timestamp for m in expected]), abs=2e-5)


def candump_of(seed: int, slices: list[float]) -> bytes:
    sim = Simulator.from_scenario("pulses", cells=12, seed=seed, overrides=FAULTY)
    out = []
    for seconds in slices:
        out.extend(candump_bytes(b, "can0") for b in sim.batches(seconds))
    return b"".join(out)


def test_same_seed_same_bytes_however_the_time_is_sliced() -> None:
    whole = candump_of(7, [30.0])
    assert whole == candump_of(7, [30.0])
    assert whole == candump_of(7, [0.05, 3.33, 11.0, 15.62])
    assert whole != candump_of(8, [30.0])


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware_sim", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_command_writes_trace_and_truth(tmp_path: Path) -> None:
    trace, truth = tmp_path / "day.log", tmp_path / "day.jsonl"
    done = run_cli("--scenario", "pulses", "--seconds", "25", "--cells", "9", "--seed", "4",
                   "--out", str(trace), "--truth", str(truth), "--truth-interval", "5",
                   "--serial", "XY-77", "--sensors", "3", "--node-id", "2",
                   "--start-time", "1700000000")
    assert done.returncode == 0, done.stderr
    messages = list(can.LogReader(trace))
    assert messages[0].timestamp == 1_700_000_000.0
    assert {m.arbitration_id & ~0xF for m in messages} == set(BASE_IDS.values())
    assert {m.arbitration_id & 0xF for m in messages} == {2}
    assert read_back(messages).serial(node_id=2) == "XY-77"
    lines = list(read_truth(truth))
    assert [r["t"] for r in lines] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    for r in lines:
        assert {"t", "soc", "capacity_ah", "r0_25c_ohm", "temp_c", "ah_throughput",
                "wh_throughput", "efc"} <= r.keys()
        assert len(r["soc"]) == len(r["capacity_ah"]) == len(r["r0_25c_ohm"]) \
            == len(r["temp_c"]) == 9
    # the pulses scenario opens with a 120 s rest
    assert {r["state"] for r in lines} == {"standby"} and lines[-1]["ah_throughput"] == 0.0
    same = run_cli("--scenario", "pulses", "--seconds", "25", "--cells", "9", "--seed", "4",
                   "--out", str(tmp_path / "again.log"), "--serial", "XY-77", "--sensors", "3",
                   "--node-id", "2", "--start-time", "1700000000")
    assert same.returncode == 0
    assert (tmp_path / "again.log").read_bytes() == trace.read_bytes()


def test_command_rejects_a_bad_scenario(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[scenario]\nbase = "nominal"\n[pack]\ncels = 4\n')
    done = run_cli("--scenario", str(bad), "--seconds", "1", "--out", str(tmp_path / "x.log"))
    assert done.returncode == 78
    assert "bad.toml" in done.stderr and "'pack.cels'" in done.stderr
    missing = run_cli("--scenario", "no-such", "--seconds", "1", "--out",
                      str(tmp_path / "x.log"))
    assert missing.returncode == 78 and "no-such" in missing.stderr
    usage = run_cli("--scenario", "nominal", "--out", str(tmp_path / "x.log"))
    assert usage.returncode == 2 and "--seconds" in usage.stderr


def test_truth_lines_are_json_with_the_documented_units(tmp_path: Path) -> None:
    sim = Simulator.from_scenario("nominal", cells=4, seed=1)
    lines: list[str] = []
    sim.add_truth_sink(lambda record: lines.append(json.dumps(record)), 60)
    for _ in sim.batches(120):
        pass
    sim.finish_truth()
    records = [json.loads(line) for line in lines]
    assert [r["t"] for r in records] == [0.0, 60.0, 120.0]
    r = records[-1]
    assert all(0 <= s <= 1 for s in r["soc"])  # fraction, not percent
    assert r["state"] == "drive" and r["current_a"] > -50
    assert r["ts"] == pytest.approx(DEFAULT_START_TIME + 120.0)


@pytest.mark.parametrize(("cells", "sensors"), [(1, 64), (256, 1)])
def test_smallest_and_largest_packs(cells: int, sensors: int) -> None:
    messages = list(Simulator.from_scenario("nominal", cells=cells, sensors=sensors,
                                            seed=1).messages(1.0))
    back = read_back(messages)
    assert not back.undecodable
    _, volts = back.cell_voltages(cells)
    assert volts.shape == (10, cells) and not np.isnan(volts).any()
    assert len(back.of("BMS_CellTemperatures")) == -(-sensors // 6)
    assert len(back.of("BMS_Balancing")) == -(-cells // 56)
    info = back.of("BMS_Info")[0].signals
    assert (info["CellCount"], info["SensorCount"]) == (cells, sensors)
    blocks = back.signal("BMS_CellVoltages", "CellVoltageBlock")
    assert blocks.max() == (cells - 1) // 3


def test_configured_periods_and_current_skew() -> None:
    overrides = {**IDEAL, "protocol": {"pack_status_period_s": 0.2, "cell_voltages_period_s": 0.5,
                                       "cell_temps_period_s": 2.0, "identity_period_s": 5.0},
                 "sensors": {**IDEAL["sensors"], "current_skew_s": 0.3}}
    sim = Simulator.from_scenario("pulses", cells=3, seed=1, overrides=overrides)
    for _ in sim.batches(115.0):
        pass
    messages = list(sim.messages(10.0))  # the first 1 C pulse starts at 120 s
    counts = Counter(m.arbitration_id for m in messages)
    # cell voltages: one block of 3 cells; identity: "SIM-0001" is two chunks
    assert (counts[0x500], counts[0x510], counts[0x520], counts[0x530], counts[0x550]) == \
        (50, 100, 20, 5, 2 * 2)
    back = read_back(messages)
    t = back.times("BMS_PackStatus") - DEFAULT_START_TIME
    current = back.signal("BMS_PackStatus", "PackCurrent")
    first = t[np.argmax(current > 0)]
    assert first == pytest.approx(120.4, abs=0.01)  # + 0.3 s skew, on the 0.2 s status grid
    times, volts = back.cell_voltages(3)
    dropped = times[np.argmax(volts[:, 0] < volts[0, 0] - 0.01)] - DEFAULT_START_TIME
    assert dropped == pytest.approx(120.0, abs=0.01)  # the voltages see it without skew
