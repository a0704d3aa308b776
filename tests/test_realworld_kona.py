"""Nine real Hyundai Kona bench logs (Vector ASC) through the Kona profile: pack-level samples.

The BMS sends no per-cell values on P-CAN, so each Batt_HV_Status frame (10 Hz) emits a sample of
the latest pack values; they are checked against cantools decoding the same frames directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import can
import pytest

from gateway.decode.assembler import PackAssembler
from gateway.decode.profile import Profile, load_profile
from gateway.metrics import Metrics
from gateway.model import Frame
from gateway.sources.base import frame_from_message

LOG_COUNT = 9


def _logs(realworld: Path) -> list[Path]:
    return sorted((realworld / "kona-bms" / "bms_diagnostics").glob("*.asc"))


@pytest.fixture(scope="module")
def profile(repo: Path, realworld: Path) -> Profile:
    return load_profile(repo / "profiles" / "kona.toml",
                        dbc_override=realworld / "kona-bms" / "pcan.dbc")


def test_all_nine_logs_are_here(realworld: Path) -> None:
    assert len(_logs(realworld)) == LOG_COUNT


@pytest.mark.parametrize("number", range(LOG_COUNT))
def test_log_gives_one_sample_per_pack_status(profile: Profile, number: int,
                                              realworld: Path) -> None:
    with can.LogReader(_logs(realworld)[number]) as reader:
        frames: list[Frame] = [frame_from_message(m) for m in reader]
    metrics = Metrics()
    assembler = PackAssembler(profile, metrics, configured_serial="KONA-BENCH")
    db = profile.database
    latest: dict[str, dict[str, float]] = {}
    checked = 0
    for frame in frames:
        samples = assembler.feed(frame)
        if frame.can_id in (0x542, 0x595, 0x596) and not frame.is_error:
            latest[db.get_message_by_frame_id(frame.can_id).name] = \
                db.decode_message(frame.can_id, frame.data, decode_choices=False)
        if frame.can_id == 0x595:
            assert len(samples) == 1
            (sample,) = samples
            status = latest["Batt_HV_Status"]
            assert sample.ts == frame.ts and sample.serial == "KONA-BENCH"
            assert sample.current_a == pytest.approx(status["IBatt"])
            assert sample.pack_voltage_v == pytest.approx(status["VBatt"])
            assert 300.0 < sample.pack_voltage_v < 420.0  # a 98s NMC pack at rest
            if "BMS_542" in latest:
                assert sample.bms_soc_pct == pytest.approx(latest["BMS_542"]["SocDisp"])
            if "BatteryCharging" in latest:
                charging = latest["BatteryCharging"]
                assert sample.min_cell_temp_c == charging["uwe596_6_TAkkuL"]
                assert sample.max_cell_temp_c == charging["uwe596_7_TAkkuH"]
            assert sample.cell_voltages_v is None and sample.cell_temps_c is None
            checked += 1
        else:
            assert samples == []
    assert checked > 20
    assert assembler.flush(math.inf) == []
    decoded = metrics.get("frames_decoded_total")
    ignored = metrics.get("frames_ignored_total")
    rejected = metrics.get("frames_rejected_total")
    assert metrics.get("samples_emitted_total") == checked
    assert decoded + ignored + rejected == len(frames)
    # what the DBC does not know (the diagnostic tool's UDS traffic, 0x7E4/0x7EC, and a
    # zero-length frame the tool sent at id 0) is counted as such, frame by frame
    known = {m.frame_id for m in db.messages}
    unknown = [f for f in frames if f.can_id not in known and not f.is_error]
    assert metrics.get("frames_rejected_total", "unknown_id") == len(unknown)
    assert {0x7E4, 0x7EC} <= {f.can_id for f in unknown}
