"""The pack assembler on the reference protocol, with frames encoded by cantools from the DBC.

A small BMS model here encodes every message of dbc/bms_reference.dbc for one node (cantools does
the bit layout, independently of the gateway's decoder) and the tests feed those frames through
the real profile, decoder and assembler.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.config import EdgeSection
from gateway.decode.assembler import PackAssembler
from gateway.decode.profile import Profile, load_profile
from gateway.metrics import Metrics
from gateway.model import Frame, Sample

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(REPO / "profiles" / "reference.toml")


@dataclass
class Bms:
    """One reference-protocol BMS (node ``node``), encoding its frames with cantools."""

    profile: Profile
    node: int = 0
    serial: str = "REF-0001"
    voltages: Sequence[float] = (3.7,) * 16
    temps: Sequence[float] = (25.0,) * 4
    voltage_invalid: set[int] = field(default_factory=set)
    temp_invalid: set[int] = field(default_factory=set)
    current: float = -12.5
    soc: float = 61.2
    state: int = 1
    faults: int = 0
    cell_count: int | None = None

    def frame(self, ts: float, message: str, signals: dict[str, float], *,
              strict: bool = True) -> Frame:
        msg = self.profile.database.get_message_by_name(message)
        return Frame(ts, msg.frame_id + self.node, msg.encode(signals, strict=strict))

    def identity(self, ts: float) -> list[Frame]:
        chunks = [self.serial[i:i + 7] for i in range(0, len(self.serial), 7)]
        return [self.frame(ts, "BMS_Identity", {
                    "SerialChunkIndex": k, "SerialChunkCount": len(chunks),
                    "SerialText": int.from_bytes(c.encode().ljust(7, b"\0"), "little")})
                for k, c in enumerate(chunks)]

    def info(self, ts: float) -> Frame:
        count = len(self.voltages) if self.cell_count is None else self.cell_count
        # not strict: a test may send a count outside the DBC's range on purpose
        return self.frame(ts, "BMS_Info", {
            "CellCount": count, "SensorCount": len(self.temps), "RatedCapacity": 94.5,
            "Chemistry": 1, "ProtocolVersion": 1}, strict=False)

    def status(self, ts: float) -> list[Frame]:
        return [
            self.frame(ts, "BMS_PackStatus", {
                "PackVoltage": round(sum(self.voltages), 2), "PackCurrent": self.current,
                "StateOfCharge": self.soc, "PackState": self.state, "StatusCounter": 0,
                "FaultFlags": self.faults}),
            self.frame(ts, "BMS_CellStats", {
                "MinCellVoltage": min(self.voltages), "MaxCellVoltage": max(self.voltages),
                "MinCellTemp": min(self.temps), "MaxCellTemp": max(self.temps),
                "MinCellVoltageIndex": 0, "MaxCellVoltageIndex": 1})]

    def voltage_blocks(self, ts: float, skip: Sequence[int] = ()) -> list[Frame]:
        frames = []
        for block in range(math.ceil(len(self.voltages) / 3)):
            if block in skip:
                continue
            cells = [block * 3 + j for j in range(3)]
            values = [self.voltages[c] if c < len(self.voltages) else 0.0 for c in cells]
            invalid = sum(1 << j for j, c in enumerate(cells)
                          if c in self.voltage_invalid or c >= len(self.voltages))
            frames.append(self.frame(ts + block * 1e-3, "BMS_CellVoltages", {
                "CellVoltageBlock": block, "CellVoltage0": values[0],
                "CellVoltage1": values[1], "CellVoltage2": values[2],
                "CellVoltageInvalid": invalid}))
        return frames

    def temp_blocks(self, ts: float) -> list[Frame]:
        frames = []
        for block in range(math.ceil(len(self.temps) / 6)):
            cells = [block * 6 + j for j in range(6)]
            values = {f"CellTemp{j}": self.temps[c] if c < len(self.temps) else -40.0
                      for j, c in enumerate(cells)}
            invalid = sum(1 << j for j, c in enumerate(cells)
                          if c in self.temp_invalid or c >= len(self.temps))
            frames.append(self.frame(ts, "BMS_CellTemperatures", {
                "CellTempBlock": block, "CellTempInvalid": invalid, **values}))
        return frames

    def second(self, ts: float) -> list[Frame]:
        """The 1 s messages: identity, description and temperatures."""
        return [*self.identity(ts), self.info(ts), *self.temp_blocks(ts)]

    def cycle(self, ts: float, skip: Sequence[int] = ()) -> list[Frame]:
        """One 100 ms cycle: pack values, then every voltage block."""
        return [*self.status(ts), *self.voltage_blocks(ts + 0.002, skip)]


def feed(assembler: PackAssembler, frames: Sequence[Frame]) -> list[Sample]:
    out: list[Sample] = []
    for frame in frames:
        out += assembler.feed(frame)
    return out


def masked(metrics: Metrics, reason: str) -> int:
    return metrics.get("values_masked_total", reason)


# -- round trip -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(voltages=st.lists(st.floats(2.5, 4.3), min_size=1, max_size=40),
       temps=st.lists(st.floats(-20.0, 60.0), min_size=1, max_size=14),
       current=st.floats(-8000.0, 8000.0), soc=st.floats(0.0, 100.0))
def test_round_trip_within_a_tenth_of_a_millivolt(profile: Profile, voltages: list[float],
                                                  temps: list[float], current: float,
                                                  soc: float) -> None:
    bms = Bms(profile, voltages=voltages, temps=temps, current=current, soc=soc, state=2,
              faults=0b1010_0001)
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    samples = feed(assembler, bms.second(10.0) + bms.cycle(10.05))
    assert len(samples) == 1
    (s,) = samples
    assert s.serial == "REF-0001"
    assert s.cell_voltages_v is not None and s.cell_voltage_valid is not None
    assert s.cell_voltage_valid.all()
    np.testing.assert_allclose(s.cell_voltages_v, voltages, atol=1e-4 + 1e-9)
    assert s.cell_temps_c is not None and s.cell_temp_valid is not None
    assert s.cell_temp_valid.all()
    np.testing.assert_allclose(s.cell_temps_c, temps, atol=0.25 + 1e-9)
    assert s.current_a == pytest.approx(current, abs=1e-3)  # positive while discharging
    assert s.bms_soc_pct == pytest.approx(soc, abs=0.05 + 1e-9)
    assert (s.state, s.fault_flags, s.chemistry) == ("charge", 0b1010_0001, "LFP")
    assert s.rated_capacity_ah == pytest.approx(94.5)
    assert s.min_cell_voltage_v == pytest.approx(min(voltages), abs=1e-4 + 1e-9)
    assert s.max_cell_temp_c == pytest.approx(max(temps), abs=0.25 + 1e-9)
    # the sample is timed by the frame that completed the cycle: the last voltage block
    last_block = math.ceil(len(voltages) / 3) - 1
    assert s.ts == pytest.approx(10.05 + 0.002 + last_block * 1e-3)
    assert metrics.get("values_masked_total") == 0


def test_one_sample_per_cycle_and_arrays_are_read_only(profile: Profile) -> None:
    bms = Bms(profile, voltages=[3.6 + 0.001 * i for i in range(24)], temps=[20.0] * 12)
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    frames = bms.second(0.0)
    for n in range(10):
        frames += bms.cycle(0.1 * (n + 1))
    samples = feed(assembler, frames)
    assert len(samples) == 10
    assert [round(s.ts, 3) for s in samples] == [round(0.1 * (n + 1) + 0.002 + 0.007, 3)
                                                 for n in range(10)]
    assert metrics.get("samples_emitted_total") == 10
    voltages = samples[0].cell_voltages_v
    assert voltages is not None
    with pytest.raises(ValueError):
        voltages[0] = 0.0
    # temperatures did not change: every sample shares the same read-only vector
    assert samples[0].cell_temps_c is samples[9].cell_temps_c
    assert assembler.flush(math.inf) == []


# -- serials and nodes ----------------------------------------------------------------------------


def test_samples_wait_for_the_serial(profile: Profile) -> None:
    bms = Bms(profile, serial="PACK-XYZ-0000042")  # three chunks
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    assert feed(assembler, [bms.info(0.0), *bms.cycle(0.1)]) == []
    assert metrics.get("samples_dropped_total", "no_serial") == 1
    chunks = bms.identity(0.15)
    with capture_logs() as logs:
        feed(assembler, [chunks[2], chunks[0]])  # out of order, one missing
        assert feed(assembler, bms.cycle(0.2)) == []
        assert metrics.get("samples_dropped_total", "no_serial") == 2
        feed(assembler, [chunks[1]])
    assert [e["serial"] for e in logs if e["event"] == "pack_serial_learned"] == \
        ["PACK-XYZ-0000042"]
    (sample,) = feed(assembler, bms.cycle(0.3))
    assert sample.serial == "PACK-XYZ-0000042"
    # four sensors announced, none received yet: nothing invented
    assert sample.cell_temps_c is not None and sample.cell_temp_valid is not None
    assert np.isnan(sample.cell_temps_c).all() and not sample.cell_temp_valid.any()
    assert assembler.serials() == {0: "PACK-XYZ-0000042"}


def test_samples_wait_for_the_cell_count(profile: Profile) -> None:
    bms = Bms(profile, voltages=[3.6] * 6)
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    # without a count, a cycle ends only when its first block comes again
    frames = bms.identity(0.0) + bms.cycle(0.1) + bms.cycle(0.2)
    assert feed(assembler, frames) == []
    assert metrics.get("samples_dropped_total", "no_cell_count") == 1
    feed(assembler, [bms.info(0.25)])
    # the count starts a fresh cycle; the next one is complete at its last block
    assert [round(s.ts, 3) for s in feed(assembler, bms.cycle(0.3))] == [0.303]


def test_two_nodes_are_two_packs(profile: Profile) -> None:
    first = Bms(profile, node=0, serial="PACK-A", voltages=[3.5] * 9, current=10.0)
    second = Bms(profile, node=7, serial="PACK-B", voltages=[3.9] * 12, current=-20.0)
    assembler = PackAssembler(profile, Metrics())
    frames = first.second(0.0) + second.second(0.0)
    for n in range(3):
        frames += first.cycle(0.1 * n + 0.1) + second.cycle(0.1 * n + 0.15)
    samples = feed(assembler, frames)
    by_serial: dict[str, list[Sample]] = {}
    for s in samples:
        by_serial.setdefault(s.serial, []).append(s)
    assert sorted(by_serial) == ["PACK-A", "PACK-B"]
    assert len(by_serial["PACK-A"]) == len(by_serial["PACK-B"]) == 3
    a, b = by_serial["PACK-A"][0], by_serial["PACK-B"][0]
    assert a.cell_voltages_v is not None and b.cell_voltages_v is not None
    assert (len(a.cell_voltages_v), len(b.cell_voltages_v)) == (9, 12)
    assert a.cell_voltages_v == pytest.approx([3.5] * 9)
    assert b.cell_voltages_v == pytest.approx([3.9] * 12)
    assert a.current_a == pytest.approx(10.0) and b.current_a == pytest.approx(-20.0)
    assert assembler.serials() == {0: "PACK-A", 7: "PACK-B"}


def test_a_new_serial_at_a_node_starts_afresh(profile: Profile) -> None:
    old = Bms(profile, serial="OLD-1", voltages=[3.3] * 6)
    new = Bms(profile, serial="NEW-2", voltages=[3.4] * 6, current=5.0)
    assembler = PackAssembler(profile, Metrics())
    assert len(feed(assembler, old.second(0.0) + old.cycle(0.1))) == 1
    with capture_logs() as logs:
        feed(assembler, new.identity(0.2))
    assert [(e["old"], e["new"]) for e in logs if e["event"] == "pack_serial_changed"] == \
        [("OLD-1", "NEW-2")]
    # the old pack's current and temperatures do not leak into the new pack's samples
    (sample,) = feed(assembler, [new.info(0.25), *new.voltage_blocks(0.3)])
    assert sample.serial == "NEW-2" and math.isnan(sample.current_a)
    assert sample.cell_temp_valid is not None and not sample.cell_temp_valid.any()


@pytest.mark.parametrize("serial", ["BAD/SERIAL", "HAS SPACE", "\x01\x02"])
def test_a_serial_that_cannot_be_a_topic_is_refused(profile: Profile, serial: str) -> None:
    bms = Bms(profile, serial=serial)
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    with capture_logs() as logs:
        frames = bms.second(0.0) + bms.cycle(0.1) + bms.second(1.0) + bms.cycle(1.1)
        assert feed(assembler, frames) == []
    assert masked(metrics, "serial_invalid") == 2
    assert metrics.get("samples_dropped_total", "no_serial") == 2
    assert [e["event"] for e in logs].count("pack_serial_invalid") == 1  # not once a second


def test_configured_serial_names_packs_without_one_on_the_bus(tmp_path: Path,
                                                              profile: Profile) -> None:
    text = (REPO / "profiles" / "reference.toml").read_text()
    text = text[:text.index("\n[serial]")] + text[text.index("\n[sample]"):]
    text = text.replace('dbc = "../dbc/', f'dbc = "{REPO}/dbc/')
    path = tmp_path / "noserial.toml"
    path.write_text(text)
    no_serial = load_profile(path)
    assembler = PackAssembler(no_serial, Metrics(), configured_serial="SITE-7")
    frames: list[Frame] = []
    for node in (0, 3):
        bms = Bms(profile, node=node, serial="ignored")
        frames += [bms.info(0.0), *bms.cycle(0.1)]
    assert sorted(s.serial for s in feed(assembler, frames)) == ["SITE-7", "SITE-7-3"]
    with capture_logs() as logs:
        unnamed = PackAssembler(no_serial, Metrics(), configured_serial="")
    assert [e["event"] for e in logs] == ["no_serial_configured"]
    assert feed(unnamed, frames) == []
    with capture_logs() as logs:
        PackAssembler(profile, Metrics(), configured_serial="SITE-7")
    assert [e["event"] for e in logs] == ["configured_serial_ignored"]


# -- validity ----------------------------------------------------------------------------------


def test_flagged_and_implausible_values_are_masked_and_counted(profile: Profile) -> None:
    voltages = [3.7] * 12
    voltages[4] = 6.2     # above cell_voltage_max_v
    voltages[9] = 0.1     # below cell_voltage_min_v
    temps = [25.0, 25.0, 85.0, 25.0, 25.0, 25.0, -39.5]
    bms = Bms(profile, voltages=voltages, temps=temps, voltage_invalid={1, 7},
              temp_invalid={0})
    metrics = Metrics()
    limits = EdgeSection(cell_temp_max_c=60.0, cell_temp_min_c=-30.0)
    assembler = PackAssembler(profile, metrics, limits=limits)
    (sample,) = feed(assembler, bms.second(0.0) + bms.cycle(0.1))
    assert sample.cell_voltage_valid is not None and sample.cell_voltages_v is not None
    assert np.flatnonzero(~sample.cell_voltage_valid).tolist() == [1, 4, 7, 9]
    assert np.isnan(sample.cell_voltages_v[[1, 4, 7, 9]]).all()
    assert sample.cell_voltages_v[0] == pytest.approx(3.7)
    assert sample.cell_temp_valid is not None and sample.cell_temps_c is not None
    assert np.flatnonzero(~sample.cell_temp_valid).tolist() == [0, 2, 6]
    assert masked(metrics, "cell_voltage_range") == 2
    assert masked(metrics, "cell_temp_range") == 2
    assert masked(metrics, "flagged_invalid") == 3


def test_a_lost_block_ends_the_cycle_with_that_block_invalid(profile: Profile) -> None:
    bms = Bms(profile, voltages=[3.6] * 15)
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    feed(assembler, bms.second(0.0))
    assert feed(assembler, bms.cycle(0.1, skip=[4])) == []  # block 4 (cells 12-14) lost
    (partial,) = feed(assembler, bms.cycle(0.2)[:3])         # block 0 again: the cycle is over
    assert partial.ts == pytest.approx(0.1 + 0.002 + 0.003)  # its last frame, block 3
    assert partial.cell_voltage_valid is not None
    assert np.flatnonzero(~partial.cell_voltage_valid).tolist() == [12, 13, 14]
    assert masked(metrics, "not_received") == 3
    rest = feed(assembler, bms.cycle(0.2)[3:])
    assert len(rest) == 1 and rest[0].cell_voltage_valid is not None
    assert rest[0].cell_voltage_valid.all()


def test_flush_emits_a_cycle_left_incomplete(profile: Profile) -> None:
    bms = Bms(profile, voltages=[3.6] * 9)
    assembler = PackAssembler(profile, Metrics())
    feed(assembler, bms.second(0.0) + bms.cycle(0.1)[:-1])
    timeout = profile.cycle_timeout_s
    assert assembler.flush(0.103 + timeout / 2) == []
    (sample,) = assembler.flush(0.103 + timeout)
    assert sample.ts == pytest.approx(0.103)
    assert assembler.flush(math.inf) == []


def test_stale_values_are_reported_absent(profile: Profile) -> None:
    bms = Bms(profile, voltages=[3.6] * 6)
    assembler = PackAssembler(profile, Metrics())
    feed(assembler, bms.second(0.0) + bms.cycle(0.1))
    # long after the last pack status and temperatures, only voltages keep coming
    later = 0.1 + profile.stale_after_s + 1.0
    (sample,) = feed(assembler, bms.voltage_blocks(later))
    assert math.isnan(sample.current_a) and sample.state == ""
    assert sample.rated_capacity_ah == pytest.approx(94.5)  # a description does not go stale
    assert sample.cell_temp_valid is not None and not sample.cell_temp_valid.any()


def test_cell_count_from_the_bus_is_bounded(profile: Profile) -> None:
    bms = Bms(profile, voltages=[3.6] * 6, cell_count=300)
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    assert feed(assembler, bms.second(0.0) + bms.cycle(0.1)) == []
    assert masked(metrics, "cell_count_range") == 1
    assert metrics.get("samples_dropped_total", "no_cell_count") == 0  # no cycle has ended yet
    bms.cell_count = 6
    feed(assembler, [bms.info(0.15)])
    assert [round(s.ts, 3) for s in feed(assembler, bms.cycle(0.2))] == [0.203]


# -- accounting --------------------------------------------------------------------------------


def test_decoded_ignored_and_rejected_add_up_to_what_was_sent(profile: Profile) -> None:
    bms = Bms(profile, voltages=[3.6] * 9)
    good = bms.second(0.0) + bms.cycle(0.1) + bms.cycle(0.2)
    status = good[len(bms.second(0.0))]
    garbage = [
        Frame(0.21, 0x7DF, bytes(8)),                              # unknown id
        Frame(0.21, 0x541, bytes(8)),                              # balancing: not used
        Frame(0.21, status.can_id, status.data[:4]),               # short
        Frame(0.21, 0x520, bytes([99]) + bytes(7)),                # block outside 0..85
        Frame(0.21, 0, b"", is_error=True),
        Frame(0.21, 0x500, b"", is_remote=True),
    ]
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics)
    samples = feed(assembler, good + garbage)
    assembler.flush(math.inf)
    assert len(samples) == 2
    decoded = metrics.get("frames_decoded_total")
    ignored = metrics.get("frames_ignored_total")
    rejected = metrics.get("frames_rejected_total")
    assert (decoded, ignored, rejected) == (len(good), 1, 5)
    assert decoded + ignored + rejected == len(good) + len(garbage)


def test_pack_level_profile_emits_on_its_trigger(tmp_path: Path) -> None:
    path = tmp_path / "packonly.toml"
    path.write_text(f'dbc = "{REPO}/dbc/bms_reference.dbc"\n'
                    '[pack]\ncurrent = "PackCurrent"\nmin_cell_voltage = "MinCellVoltage"\n'
                    '[sample]\nmin_interval_s = 0.25\n')
    pack_only = load_profile(path)
    assert pack_only.trigger == "BMS_PackStatus"
    assembler = PackAssembler(pack_only, Metrics(), configured_serial="P-1")
    bms = Bms(load_profile(REPO / "profiles" / "reference.toml"), current=3.0)
    frames = []
    for n in range(10):
        frames += bms.status(0.1 * n)
    samples = feed(assembler, frames)
    assert [round(s.ts, 1) for s in samples] == [0.0, 0.3, 0.6, 0.9]
    first = samples[0]
    assert first.cell_voltages_v is None and first.cell_temps_c is None
    assert first.current_a == pytest.approx(3.0)
    # BMS_CellStats follows the status frame: the next sample has the minimum
    assert math.isnan(first.min_cell_voltage_v)
    assert samples[1].min_cell_voltage_v == pytest.approx(3.7)
    # a second trace whose clock starts again at 0 is not silenced by the first one's times
    again = feed(assembler, bms.status(0.05))
    assert [s.ts for s in again] == [0.05]
