"""The per-pack state's checkpoints: exact round trip, versions, refusal of bad bytes, sizes."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gateway.config import EdgeSection
from gateway.edge import kernels
from gateway.edge.core import EdgeCore
from gateway.edge.kernels import AH_TOTAL
from gateway.edge.state import (
    CAPACITY_PREFIX,
    RESISTANCE_PREFIX,
    STATE_VERSION,
    CheckpointError,
    PackState,
)
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from tests.test_edge_core import SCENARIO_SETTINGS, T0, make_sample, mixed_scenario

SERIAL = "PACK-0001"


def scenario_checkpoints() -> dict[str, bytes]:
    core = EdgeCore(SCENARIO_SETTINGS, Metrics())
    core.process(mixed_scenario(60.0))
    return core.take_checkpoints()


def scenario_state() -> PackState:
    found = scenario_checkpoints()
    return PackState.from_bytes(found["edge/" + SERIAL], SERIAL,
                                resistance=found.get(RESISTANCE_PREFIX + SERIAL),
                                capacity=found.get(CAPACITY_PREFIX + SERIAL))


def archive(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob)) as stored:
        return {name: stored[name] for name in stored.files}


def rewrite(blob: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    arrays: dict[str, Any] = archive(blob)
    change(arrays)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def test_a_state_round_trips_bit_exactly() -> None:
    state = scenario_state()
    assert state.cell_count == 16 and state.sensor_count == 4
    assert state.r0_steps > 0 and state.totals[0] > 0
    again = PackState.from_bytes(state.to_bytes(), SERIAL, resistance=state.resistance_bytes(),
                                 capacity=state.capacity_bytes())
    assert again.to_bytes() == state.to_bytes()
    assert again.resistance_bytes() == state.resistance_bytes()
    assert again.capacity_bytes() == state.capacity_bytes()
    for name in ("totals", "counters", "pack", "cells", "r0_ring", "r0_ring_temp_c",
                 "r0_cell_steps", "r0_bin_ln", "last_cell_voltages_v", "last_cell_valid"):
        np.testing.assert_array_equal(getattr(again, name), getattr(state, name))
        assert getattr(again, name).flags.writeable, name
    assert (again.last_ts, again.first_ts, again.telemetry_tick_ts, again.health_tick_ts) == (
        state.last_ts, state.first_ts, state.telemetry_tick_ts, state.health_tick_ts)
    np.testing.assert_array_equal(again.cell_validity.since, state.cell_validity.since)


def test_the_running_checkpoint_of_a_192_cell_pack_is_small_and_history_goes_only_on_change(
) -> None:
    rng = np.random.default_rng(3)
    core = EdgeCore(EdgeSection(rated_capacity_ah=100.0, telemetry_interval_s=1.0,
                                chemistry="NMC"), Metrics())
    r0 = rng.uniform(0.8e-3, 1.2e-3, 192)
    samples = []
    for k in range(400):
        current = 80.0 if (k // 40) % 2 else 0.0
        samples.append(make_sample(T0 + k / 10, current, cells=3.7 - current * r0
                                   + rng.normal(0, 2e-4, 192), temps=[25.0] * 16))
    core.process(samples[:310])
    first = core.take_checkpoints()
    assert RESISTANCE_PREFIX + SERIAL in first  # steps were accepted
    # The running state of 192 cells, written with every commit that carries records: v1 wrote
    # 40 kB with every batch.
    assert len(first["edge/" + SERIAL]) < 24_000
    core.process(samples[310:320])  # current steady: no step completes
    second = core.take_checkpoints()
    assert list(second) == ["edge/" + SERIAL]


def test_a_checkpoint_without_a_later_field_loads_with_that_fields_default() -> None:
    blob = rewrite(scenario_state().to_bytes(), lambda a: a.pop("counters"))
    state = PackState.from_bytes(blob, SERIAL)
    np.testing.assert_array_equal(state.counters, np.zeros(kernels.COUNTER_SLOTS))
    assert state.totals[0] > 0


def version_1_checkpoint(cells: int = 3) -> bytes:
    """A checkpoint as the version 1 edge core wrote it (gateway/edge/state.py at v1)."""
    ring = np.zeros((cells, 16))
    ring[:, :4] = 1.5e-3
    arrays: dict[str, Any] = {
        "version": np.int64(1), "serial": np.str_(SERIAL), "first_ts": np.float64(T0),
        "last_ts": np.float64(T0 + 100), "last_current_a": np.float64(20.0),
        "last_pack_voltage_v": np.float64(11.1), "last_cell_voltages_v": np.full(cells, 3.7),
        "last_cell_valid": np.ones(cells, np.bool_),
        "totals": np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0]),
        "bus_rated_capacity_ah": np.float64(50.0), "r0_ring": ring,
        "r0_cell_steps": np.full(cells, 4, np.int64), "r0_steps": np.int64(4),
        "telemetry_tick_ts": np.float64(T0 + 100), "health_tick_ts": np.float64(T0 + 60),
    }
    for prefix, channels, initial in (("faults", 1, 0), ("cell_validity", cells, 1),
                                      ("temp_validity", 2, 1)):
        arrays[f"{prefix}.reported"] = np.full(channels, initial, np.int64)
        arrays[f"{prefix}.candidate"] = np.full(channels, initial, np.int64)
        arrays[f"{prefix}.since"] = np.full(channels, np.nan)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def test_a_version_1_checkpoint_continues_its_counters_and_resistances() -> None:
    core = EdgeCore(EdgeSection(health_interval_s=10.0), Metrics())
    core.restore({"edge/" + SERIAL: version_1_checkpoint()})
    records = core.process([make_sample(T0 + 101 + k, 20.0, cells=[3.7] * 3,
                                        temps=[25.0, 25.0]) for k in range(10)])
    health = next(r for r in records if r.kind.value == "health").body
    # The first sample after the restore is on a new health interval; the second of 20 A since
    # the checkpoint's last sample is integrated across the restart.
    assert health["capacityThroughput"] == pytest.approx(3.0 + 20.0 / 3600, rel=1e-12)
    assert health["ratedCapacity"] == 50.0
    assert health["r0_25c_ohm"]["cells"] == [pytest.approx(1.5e-3)] * 3
    assert health["r0_steps"] == 4
    checkpoints = core.take_checkpoints()
    assert archive(checkpoints["edge/" + SERIAL])["version"] == STATE_VERSION


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.update(version=np.int64(STATE_VERSION + 1)), "version"),
    (lambda a: a.pop("version"), "version"),
    (lambda a: a.update(serial=np.str_("OTHER")), "belongs to 'OTHER'"),
    (lambda a: a.update(cells=np.zeros((3, kernels.CELL_SLOTS))), "cells has shape"),
    (lambda a: a.update({"cell_validity.since": np.zeros(2)}), "cell_validity.since"),
    (lambda a: a.update(totals=-np.ones(6)), "totals"),
    (lambda a: a.update(totals=np.full(6, np.nan)), "totals"),
    (lambda a: a.update(counters=-np.ones(kernels.COUNTER_SLOTS)), "counters"),
])
def test_a_checkpoint_that_cannot_be_trusted_is_refused(
        change: Callable[[dict[str, Any]], None], message: str) -> None:
    blob = rewrite(scenario_state().to_bytes(), change)
    with pytest.raises(CheckpointError, match=message):
        PackState.from_bytes(blob, SERIAL)


def test_a_history_that_does_not_fit_the_running_state_is_refused() -> None:
    state = scenario_state()
    other = rewrite(state.resistance_bytes(), lambda a: a.update(r0_ring=np.zeros(
        (3, 16), np.float32)))
    with pytest.raises(CheckpointError, match="r0_ring has shape"):
        PackState.from_bytes(state.to_bytes(), SERIAL, resistance=other)


@pytest.mark.parametrize("blob", [b"", b"not a zip", b"PK\x03\x04" + bytes(40)])
def test_bytes_that_do_not_decode_are_refused(blob: bytes) -> None:
    with pytest.raises(CheckpointError, match="does not decode") as caught:
        PackState.from_bytes(blob, "X")
    assert isinstance(caught.value, GatewayError) and isinstance(caught.value, ValueError)


def test_restore_takes_edge_keys_only_and_refuses_a_bad_one() -> None:
    found = scenario_checkpoints()
    state = PackState.from_bytes(found["edge/" + SERIAL], SERIAL)
    core = EdgeCore(EdgeSection(), Metrics())
    core.restore({**found, "publisher/session": b"\x00garbage"})
    assert core.take_checkpoints() == {}  # restoring is not a change
    (record,) = core.process([make_sample(state.last_ts + 1.0, 36.0)])
    assert record.body["capacity_throughput_ah"] > state.totals[AH_TOTAL]
    with pytest.raises(CheckpointError):
        EdgeCore(EdgeSection(), Metrics()).restore({"edge/PACK-0002": b"\x00garbage"})
    with pytest.raises(CheckpointError, match="no running state"):
        EdgeCore(EdgeSection(), Metrics()).restore(
            {RESISTANCE_PREFIX + SERIAL: found[RESISTANCE_PREFIX + SERIAL]})
