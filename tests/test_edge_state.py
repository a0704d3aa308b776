"""The per-pack state's checkpoint format: exact round trip, versioning, refusal of bad bytes."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from gateway.config import EdgeSection
from gateway.edge.core import EdgeCore
from gateway.edge.kernels import AH_TOTAL
from gateway.edge.state import STATE_VERSION, CheckpointError, PackState
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from tests.test_edge_core import SCENARIO_SETTINGS, make_sample, mixed_scenario


def scenario_state() -> PackState:
    core = EdgeCore(SCENARIO_SETTINGS, Metrics())
    core.process(mixed_scenario(60.0))
    return PackState.from_bytes(core.take_checkpoints()["edge/PACK-0001"], "PACK-0001")


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
    again = PackState.from_bytes(state.to_bytes(), state.serial)
    assert again.to_bytes() == state.to_bytes()
    for name in ("totals", "r0_ring", "r0_cell_steps", "last_cell_voltages_v", "last_cell_valid"):
        np.testing.assert_array_equal(getattr(again, name), getattr(state, name))
        assert getattr(again, name).flags.writeable
    assert (again.last_ts, again.first_ts, again.telemetry_tick_ts, again.health_tick_ts) == (
        state.last_ts, state.first_ts, state.telemetry_tick_ts, state.health_tick_ts)
    np.testing.assert_array_equal(again.cell_validity.since, state.cell_validity.since)


def test_a_checkpoint_without_a_later_field_loads_with_that_fields_default() -> None:
    blob = rewrite(scenario_state().to_bytes(), lambda a: a.pop("bus_rated_capacity_ah"))
    state = PackState.from_bytes(blob, "PACK-0001")
    assert np.isnan(state.bus_rated_capacity_ah)
    assert state.totals[0] > 0


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.update(version=np.int64(STATE_VERSION + 1)), "version"),
    (lambda a: a.pop("version"), "version"),
    (lambda a: a.update(serial=np.str_("OTHER")), "belongs to 'OTHER'"),
    (lambda a: a.update(r0_ring=np.zeros((3, 16))), "r0_ring has shape"),
    (lambda a: a.update({"cell_validity.since": np.zeros(2)}), "cell_validity.since"),
    (lambda a: a.update(totals=-np.ones(6)), "totals"),
    (lambda a: a.update(totals=np.full(6, np.nan)), "totals"),
])
def test_a_checkpoint_that_cannot_be_trusted_is_refused(
        change: Callable[[dict[str, Any]], None], message: str) -> None:
    blob = rewrite(scenario_state().to_bytes(), change)
    with pytest.raises(CheckpointError, match=message):
        PackState.from_bytes(blob, "PACK-0001")


@pytest.mark.parametrize("blob", [b"", b"not a zip", b"PK\x03\x04" + bytes(40)])
def test_bytes_that_do_not_decode_are_refused(blob: bytes) -> None:
    with pytest.raises(CheckpointError, match="does not decode") as caught:
        PackState.from_bytes(blob, "X")
    assert isinstance(caught.value, GatewayError) and isinstance(caught.value, ValueError)


def test_restore_takes_edge_keys_only_and_refuses_a_bad_one() -> None:
    state = scenario_state()
    core = EdgeCore(EdgeSection(), Metrics())
    core.restore({"edge/PACK-0001": state.to_bytes(), "publisher/session": b"\x00garbage"})
    assert core.take_checkpoints() == {}  # restoring is not a change
    (record,) = core.process([make_sample(state.last_ts + 1.0, 36.0)])
    assert record.body["capacity_throughput_ah"] > state.totals[AH_TOTAL]
    with pytest.raises(CheckpointError):
        EdgeCore(EdgeSection(), Metrics()).restore({"edge/PACK-0002": b"\x00garbage"})
