"""Every real DBC file beside the repository loads, and every real trace file reads.

Plus the Chevrolet Volt profile assembling a full 96-cell cycle from frames that cantools encodes
with the opendbc DBC (there is no Volt trace among the real files).
"""

from __future__ import annotations

import math
from pathlib import Path

import can
import numpy as np
import pytest
from structlog.testing import capture_logs

from gateway.decode.assembler import PackAssembler
from gateway.decode.profile import load_dbc, load_profile
from gateway.metrics import Metrics
from gateway.model import Frame

#: (file under ../shared/realworld, messages cantools reads from it)
DBCS = [
    ("foxbms/foxbms.dbc", 41),
    ("foxbms/IVT-S_12082020.dbc", 10),
    ("kona-bms/pcan.dbc", 107),
    ("opendbc-gm-volt/gm_global_a_high_voltage_management.dbc", 12),
    ("css-mf4-ev-uds/tp_uds.dbc", 2),
    ("css-mf4-ev-uds/tp_uds_nissan.dbc", 1),
]

#: (file under ../shared/realworld, frames python-can reads from it)
TRACES = [
    ("foxbms/can-log.trc", 9),
    ("python-can-formats/logfile.asc", 20),
    ("python-can-formats/test_CanMessage.asc.gz", 2),
    ("python-can-formats/test_CanMessage.blf", 2),
    ("python-can-formats/test_CanFdMessage.blf", 2),
    ("python-can-formats/test_CanMessage.trc", 2),
    ("python-can-formats/test_CanMessage_V1_0_BUS1.trc", 11),
    ("python-can-formats/test_CanMessage_V1_1.trc", 11),
    ("python-can-formats/test_CanMessage_V1_3.trc", 11),
    ("python-can-formats/test_CanMessage_V2_0_BUS1.trc", 11),
    ("python-can-formats/test_CanMessage_V2_1.trc", 11),
    ("css-mf4-ev-uds/kona-ev-uds_17BD1DB7_00000170.MF4", 2010),
    ("css-mf4-ev-uds/leaf2019-uds_2F6913DB_00000001.MF4", 5588),
]


def test_the_lists_cover_every_file(realworld: Path) -> None:
    dbcs = {str(p.relative_to(realworld)) for p in realworld.rglob("*.dbc")}
    assert dbcs == {name for name, _ in DBCS}
    traces = {str(p.relative_to(realworld)) for p in realworld.rglob("*")
              if p.suffix.lower() in (".asc", ".blf", ".trc", ".mf4", ".gz", ".log", ".csv")}
    kona = {str(p.relative_to(realworld))
            for p in (realworld / "kona-bms" / "bms_diagnostics").glob("*.asc")}
    assert traces - kona == {name for name, _ in TRACES}  # the Kona logs: test_realworld_kona


@pytest.mark.parametrize(("name", "messages"), DBCS)
def test_dbc_loads(realworld: Path, name: str, messages: int) -> None:
    with capture_logs() as logs:
        database = load_dbc(realworld / name)
    assert len(database.messages) == messages
    fixed = [e for e in logs if e["event"] == "dbc_sections_inserted"]
    assert len(fixed) == (1 if name == "kona-bms/pcan.dbc" else 0)


@pytest.mark.parametrize(("name", "count"), TRACES)
def test_trace_reads(realworld: Path, name: str, count: int) -> None:
    with can.LogReader(realworld / name) as reader:
        messages = list(reader)
    assert len(messages) == count
    assert all(isinstance(m.arbitration_id, int) for m in messages)
    assert messages[0].timestamp <= messages[-1].timestamp


def test_volt_profile_completes_a_96_cell_cycle(repo: Path, realworld: Path) -> None:
    profile = load_profile(
        repo / "profiles" / "volt.toml",
        dbc_override=realworld / "opendbc-gm-volt" / "gm_global_a_high_voltage_management.dbc")
    db = profile.database
    rng = np.random.default_rng(7)
    volts = np.round(rng.uniform(3.5, 4.1, 96) / 0.00125) * 0.00125
    frames: list[Frame] = []
    stats = db.get_message_by_name("Pack_Stats")
    frames.append(Frame(0.0, stats.frame_id, stats.encode({"Pack_Voltage": 370.0,
                                                           "Pack_Current": 2.0})))
    temp = db.get_message_by_name("Battery_temp")
    frames.append(Frame(0.0, temp.frame_id, temp.encode(
        {"Switch": 0, **{f"Temp_{c}": 20.0 + i for i, c in enumerate("ABCDEF")}})))
    frames.append(Frame(0.0, temp.frame_id, temp.encode(
        {"Switch": 1, **{f"Temp_{c}": 30.0 + i for i, c in enumerate("GHI")}})))
    ts = 0.1
    for module in range(1, 5):
        message = db.get_message_by_name(f"Battery_Module_{module}")
        for bank in range(8):
            cell = (module - 1) * 24 + bank * 3
            signals = {f"Cell_Bank_Number_{module}": bank,
                       **{f"Voltage_{module}_{bank}_{c}": float(volts[cell + j])
                          for j, c in enumerate("ABC")}}
            frames.append(Frame(ts, message.frame_id, message.encode(signals)))
            ts += 0.001
    assembler = PackAssembler(profile, Metrics(), configured_serial="VOLT-1")
    samples = [s for f in frames for s in assembler.feed(f)]
    (sample,) = samples
    assert sample.ts == pytest.approx(ts - 0.001)  # the 32nd frame completed the cycle
    assert sample.cell_voltages_v is not None and sample.cell_voltage_valid is not None
    assert sample.cell_voltage_valid.all()
    np.testing.assert_allclose(sample.cell_voltages_v, volts, atol=1e-9)
    assert sample.cell_temps_c is not None
    np.testing.assert_allclose(sample.cell_temps_c, [20, 21, 22, 23, 24, 25, 30, 31, 32])
    assert sample.pack_voltage_v == pytest.approx(370.0)
    assert assembler.flush(math.inf) == []
