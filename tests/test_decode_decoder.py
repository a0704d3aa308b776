"""The decoder: precompiled unpacks equal cantools' decode; every frame is decoded or counted.

The decoder reads signals through plans compiled at load time instead of ``Message.decode``; these
tests hold it to cantools on random payloads for the reference, foxBMS 2 and Volt profiles, and
check that no frame, however broken, escapes the accounting or raises.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import can
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.decode.decoder import EXTENDED_FLAG, METRICS_BATCH, Decoder, Route
from gateway.decode.profile import Binding, Profile, Target, load_profile
from gateway.metrics import Metrics
from gateway.model import Frame

_SETTINGS = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def reference(repo: Path) -> Profile:
    return load_profile(repo / "profiles" / "reference.toml")


@pytest.fixture(scope="module")
def foxbms(repo: Path, realworld: Path) -> Profile:
    return load_profile(repo / "profiles" / "foxbms2.toml",
                        dbc_override=realworld / "foxbms" / "foxbms.dbc")


@pytest.fixture(scope="module")
def volt(repo: Path, realworld: Path) -> Profile:
    return load_profile(
        repo / "profiles" / "volt.toml",
        dbc_override=realworld / "opendbc-gm-volt" / "gm_global_a_high_voltage_management.dbc")


def _entries(route: Route) -> list[tuple[Target, int, int, float, float]]:
    """Every (target, index, position, factor, offset) a route feeds, for comparison."""
    out: list[tuple[Target, int, int, float, float]] = []
    out += [(Target(slot), 0, p, f, o) for p, slot, f, o in route.scalars]
    out += [(Target.CELL_VOLTAGE, cell, p, f, o) for p, cell, f, o in route.voltages]
    out += [(Target.CELL_TEMP, cell, p, f, o) for p, cell, f, o in route.temps]
    out += [(Target.CELL_VOLTAGE_INVALID, cell, p, 1.0, 0.0) for p, cell in route.voltage_flags]
    out += [(Target.CELL_TEMP_INVALID, cell, p, 1.0, 0.0) for p, cell in route.temp_flags]
    out += [(Target.FAULT_BIT, bit, p, 1.0, 0.0) for p, bit in route.fault_bits]
    if route.fault_word >= 0:
        out.append((Target.FAULT_FLAGS, 0, route.fault_word, 1.0, 0.0))
    out += [((Target.STATE, Target.CHEMISTRY)[slot], 0, p, 1.0, 0.0) for p, slot, _ in route.texts]
    out += [((Target.CELL_VOLTAGE_COUNT, Target.CELL_TEMP_COUNT)[which], 0, p, f, o)
            for p, which, f, o in route.counts]
    for p, bits in route.voltage_masks:
        out.append((Target.CELL_VOLTAGE_INVALID_MASK, bits[0][1], p, 1.0, 0.0))
    for p, bits in route.temp_masks:
        out.append((Target.CELL_TEMP_INVALID_MASK, bits[0][1], p, 1.0, 0.0))
    if route.serial is not None:
        out.append((Target.SERIAL_TEXT, 0, route.serial.text, 1.0, 0.0))
        if route.serial.index >= 0:
            out.append((Target.SERIAL_CHUNK_INDEX, 0, route.serial.index, 1.0, 0.0))
            out.append((Target.SERIAL_CHUNK_COUNT, 0, route.serial.count, 1.0, 0.0))
    return out


def _check_against_cantools(profile: Profile, frame_id: int, data: bytes) -> None:
    decoder = Decoder(profile, Metrics())
    message = profile.database.get_message_by_frame_id(frame_id)
    decoded = decoder.decode(Frame(0.0, frame_id, data, is_extended=message.is_extended_frame))
    try:
        expected = message.decode(data, decode_choices=False, scaling=False)
    except Exception:  # cantools refuses the payload (a multiplexer value it does not know)
        assert decoded is None
        return
    if decoded is None:  # a selector value the profile does not use: nothing to compare
        return
    _, route, values = decoded
    bindings: dict[tuple[Target, int], Binding] = {
        (b.target, b.bits[0][1] if b.bits else b.index): b
        for b in profile.bindings if b.message == message.name
        and (b.selector is None or b.selector_value == route.selector_value)}
    entries = _entries(route)
    assert entries, "a decoded frame feeds something"
    for target, index, position, factor, offset in entries:
        binding = bindings[(target, index)]
        raw = expected[binding.signal]
        assert values[position] == raw, (binding.signal, values[position], raw)
        signal = message.get_signal_by_name(binding.signal)
        if target in (Target.CELL_VOLTAGE, Target.CELL_TEMP):
            physical = message.decode(data, decode_choices=False)[binding.signal]
            unit = 1e-3 if signal.unit == "mV" else 1.0
            assert values[position] * factor + offset == pytest.approx(physical * unit)


@_SETTINGS
@given(data=st.data())
def test_reference_values_equal_cantools(reference: Profile, data: Any) -> None:
    message = data.draw(st.sampled_from([m for m in reference.database.messages
                                         if m.name != "BMS_Balancing"]))
    payload = data.draw(st.binary(min_size=message.length, max_size=message.length))
    _check_against_cantools(reference, message.frame_id, payload)


@_SETTINGS
@given(data=st.data())
def test_foxbms_values_equal_cantools(foxbms: Profile, data: Any) -> None:
    used = sorted({b.message for b in foxbms.bindings})
    message = foxbms.database.get_message_by_name(data.draw(st.sampled_from(used)))
    payload = bytearray(data.draw(st.binary(min_size=message.length, max_size=message.length)))
    if message.name in ("f_CellVoltages", "f_CellTemperatures"):
        payload[0] = data.draw(st.integers(0, 60))  # mostly defined multiplexer values
    _check_against_cantools(foxbms, message.frame_id, bytes(payload))


@_SETTINGS
@given(data=st.data())
def test_volt_values_equal_cantools(volt: Profile, data: Any) -> None:
    used = sorted({b.message for b in volt.bindings})
    message = volt.database.get_message_by_name(data.draw(st.sampled_from(used)))
    payload = data.draw(st.binary(min_size=message.length, max_size=message.length))
    _check_against_cantools(volt, message.frame_id, payload)


def test_reference_block_routes_three_cells_with_their_mask_bits(reference: Profile) -> None:
    decoder = Decoder(reference, Metrics())
    message = reference.database.get_message_by_name("BMS_CellVoltages")
    data = message.encode({"CellVoltageBlock": 4, "CellVoltage0": 3.1, "CellVoltage1": 3.2,
                           "CellVoltage2": 3.3, "CellVoltageInvalid": 0b010})
    decoded = decoder.decode(Frame(1.0, 0x520 + 9, data))
    assert decoded is not None
    node, route, values = decoded
    assert node == 9
    assert [(cell, round(values[p] * f + o, 4)) for p, cell, f, o in route.voltages] == \
        [(12, 3.1), (13, 3.2), (14, 3.3)]
    ((position, bits),) = route.voltage_masks
    assert values[position] == 0b010 and bits == ((0, 12), (1, 13), (2, 14))
    assert route.voltage_group == 4 and decoder.voltage_groups[4] == {12, 13, 14}


# -- accounting -------------------------------------------------------------------------------


def _outcomes(metrics: Metrics) -> dict[str, int]:
    snapshot = metrics.snapshot()["counters"]
    out = {f"rejected:{k}": v for k, v in snapshot.get("frames_rejected_total", {}).items()}
    out["decoded"] = metrics.get("frames_decoded_total")
    out["ignored"] = metrics.get("frames_ignored_total", "not_used")
    return out


def test_every_kind_of_bad_frame_is_counted_once(reference: Profile, foxbms: Profile) -> None:
    metrics = Metrics()
    decoder = Decoder(reference, metrics)
    status = reference.database.get_message_by_name("BMS_PackStatus")
    good = status.encode({"PackVoltage": 50, "PackCurrent": 1, "StateOfCharge": 50,
                          "PackState": 1, "StatusCounter": 0, "FaultFlags": 0})
    frames = [
        Frame(0, 0x500, good),                               # decoded
        Frame(0, 0x503, good + b"\0" * 56, is_fd=True),      # longer than the DBC: decoded
        Frame(0, 0x540, bytes(8)),                           # BMS_Balancing: not used
        Frame(0, 0x7E4, bytes(8)),                           # not in the DBC
        Frame(0, 0x500, good, is_extended=True),             # extended id 0x500: not in the DBC
        Frame(0, 0x500, good[:5]),                           # too short
        Frame(0, 0x520, bytes([200]) + bytes(7)),            # block 200, the DBC says 0..85
        Frame(0, 0, b"", is_error=True),
        Frame(0, 0x500, b"", is_remote=True),
    ]
    results = [decoder.decode(f) for f in frames]
    decoder.sync_metrics()
    assert [r is not None for r in results] == [True, True] + [False] * 7
    assert _outcomes(metrics) == {"decoded": 2, "ignored": 1, "rejected:unknown_id": 2,
                                  "rejected:malformed": 2, "rejected:error_frame": 1,
                                  "rejected:remote_frame": 1}
    fox_metrics = Metrics()
    fox = Decoder(foxbms, fox_metrics)
    assert fox.decode(Frame(0, 0x250, bytes([54]) + bytes(7))) is None  # multiplexer 54 of 0..53
    assert fox_metrics.get("frames_rejected_total", "malformed") == 1


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.builds(
    Frame,
    ts=st.floats(0, 1e9),
    can_id=st.one_of(st.integers(0x500, 0x56F), st.integers(0, 0x1FFFFFFF)),
    data=st.binary(max_size=64),
    is_extended=st.booleans(), is_fd=st.booleans(), is_error=st.booleans(),
    is_remote=st.booleans()), max_size=60))
def test_garbage_never_raises_and_is_accounted(reference: Profile, frames: list[Frame]) -> None:
    metrics = Metrics()
    decoder = Decoder(reference, metrics)
    for frame in frames:
        decoder.decode(frame)
    decoder.sync_metrics()
    assert sum(_outcomes(metrics).values()) == len(frames)


def test_frequent_counts_reach_metrics_in_batches(reference: Profile) -> None:
    metrics = Metrics()
    decoder = Decoder(reference, metrics)
    frame = Frame(0, 0x540, bytes(8))  # ignored
    for _ in range(METRICS_BATCH - 1):
        decoder.decode(frame)
    assert metrics.get("frames_ignored_total") == 0
    decoder.decode(frame)
    assert metrics.get("frames_ignored_total") == METRICS_BATCH
    decoder.decode(frame)
    decoder.sync_metrics()
    assert metrics.get("frames_ignored_total") == METRICS_BATCH + 1


# -- kernel filters -----------------------------------------------------------------------------


def test_receive_filters_pass_the_used_ids_of_every_node(reference: Profile) -> None:
    decoder = Decoder(reference, Metrics())
    filters = decoder.receive_filters()
    used = {0x500, 0x510, 0x520, 0x530, 0x550, 0x560}
    assert {f["can_id"] for f in filters} == used
    assert all(f["can_mask"] == 0x7F0 and f["extended"] is False for f in filters)
    channel = f"decode-filters-{uuid.uuid4().hex}"
    with can.Bus(interface="virtual", channel=channel, can_filters=filters) as rx, \
            can.Bus(interface="virtual", channel=channel) as tx:
        for can_id in (0x505, 0x540, 0x7E4, 0x52F, 0x123):
            tx.send(can.Message(arbitration_id=can_id, data=bytes(8), is_extended_id=False))
        tx.send(can.Message(arbitration_id=0x500, data=bytes(8), is_extended_id=True))
        received = []
        for _ in range(10):
            message = rx.recv(timeout=0.2)
            if message is None:
                break
            received.append(message.arbitration_id)
    assert received == [0x505, 0x52F]


def test_extended_ids_keep_their_flag(tmp_path: Path) -> None:
    dbc = tmp_path / "ext.dbc"
    dbc.write_text('VERSION ""\n\nBS_:\n\nBU_: B\n\nBO_ 2566848512 Ext: 8 B\n'
                   ' SG_ Amps : 0|16@1- (0.1,0) [-3276.8|3276.7] "A" B\n')
    profile_path = tmp_path / "ext.toml"
    profile_path.write_text('dbc = "ext.dbc"\nnode_id_mask = 0xFF\n[pack]\ncurrent = "Amps"\n')
    profile = load_profile(profile_path)
    decoder = Decoder(profile, Metrics())
    assert decoder.receive_filters() == [{"can_id": 0x18FF0000, "can_mask": 0x1FFFFF00,
                                          "extended": True}]
    decoded = decoder.decode(Frame(0, 0x18FF0017, (123).to_bytes(2, "little") + bytes(6),
                                   is_extended=True))
    assert decoded is not None and decoded[0] == 0x17 and decoded[2] == (123,)
    assert EXTENDED_FLAG & 0x18FF0000 == 0
    assert decoder.decode(Frame(0, 0x18FF0017 & 0x7FF, bytes(8))) is None
