"""Passport counters against the simulator's integrals, exact event counts, and continuity of
the lifetime counters across a SIGKILL of the process that computes them."""

from __future__ import annotations

import itertools
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from gateway.config import EdgeSection
from gateway.edge.core import EdgeCore
from gateway.edge.state import PackState
from gateway.metrics import Metrics
from gateway.model import RecordKind
from gateway.store.sqlite import SqliteStore
from tests.support.daemon import REPO, child_env
from tests.test_health_sim import edge, protocol, simulate

#: Two cycles that go beyond the cells' limits: discharged until the weakest cell is at 2.7 V
#: (a deep discharge below the NMC limit of 2.8 V), charged at a constant 4.3 V per cell (an
#: overcharge above 4.25 V); the BMS's own protection is set wider so it lets both happen.
ABUSE = {
    "protocol": protocol(1.0),
    "pack": {"initial_soc": 0.95},
    "protection": {"cell_v_min": 2.5, "cell_v_max": 4.4},
    "schedule": {"repeat": True, "segment": [
        {"kind": "constant", "c_rate": 1.0, "until_min_cell_v": 2.7},
        {"kind": "rest", "duration_s": 300.0},
        {"kind": "charge", "c_rate": 1.0, "cv_cell_v": 4.3, "taper_c": 0.3},
        {"kind": "rest", "duration_s": 300.0}]},
}
IDEAL_CURRENT = {"current_noise_a": 0.0, "current_offset_fs": 0.0, "current_gain_error": 0.0,
                 "current_lsb_a": 0.0, "pack_voltage_noise_v": 0.0}
CYCLE_S = 7800.0  # one discharge–rest–charge–rest cycle is about 2 h


def abuse_run(ideal: bool, seconds: float = 2 * CYCLE_S) -> Any:
    overrides: dict[str, Any] = dict(ABUSE)
    if ideal:
        overrides["sensors"] = IDEAL_CURRENT
    return simulate("nominal", seconds, seed=3, overrides=overrides, truth_s=1.0)


@pytest.mark.parametrize(("ideal", "tolerance"), [(True, 0.001), (False, 0.005)],
                         ids=["ideal-current-sensor", "default-sensor-errors"])
def test_throughput_and_cycles_match_the_simulators_integrals(ideal: bool,
                                                              tolerance: float) -> None:
    run = abuse_run(ideal)
    fed = edge(health_interval_s=60.0)
    with structlog.testing.capture_logs():
        fed.feed(run.samples, batch=500)
    body = fed.health[-1].body
    truth = run.truth_at(fed.health[-1].ts)
    pairs = {
        "capacityThroughput": truth["ah_throughput"],
        "capacityThroughputCharge": truth["charged_ah"],
        "capacityThroughputDischarge": truth["discharged_ah"],
        "energyThroughput": truth["wh_throughput"] / 1000.0,
        "energyThroughputCharge": truth["charged_wh"] / 1000.0,
        "energyThroughputDischarge": truth["discharged_wh"] / 1000.0,
        "numberOfFullCycles": truth["efc"],
    }
    worst = max(abs(body[key] / value - 1.0) for key, value in pairs.items())
    print(f"\nACCEPTANCE counters_{'ideal' if ideal else 'default'} worst={100 * worst:.4f}%")
    for key, value in pairs.items():
        assert body[key] == pytest.approx(value, rel=tolerance), key
    # Two deep discharges and two overcharges, each one event however long it lasted.
    assert body["negativeEvents"]["deepDischarge"] == 2
    assert body["negativeEvents"]["overcharge"] == 2
    types = [e["type"] for e in fed.events()]
    assert types.count("deep_discharge") == 2 and types.count("deep_discharge_cleared") == 2
    assert types.count("overcharge") == 2
    # The SOC histogram holds all the time that had an SOC; nothing was hot or cold.
    assert sum(body["soc_histogram_h"]) == pytest.approx(
        (fed.health[-1].ts - run.samples[0].ts) / 3600.0, rel=1e-3)
    assert body["temperatureInformation"]["timeExtremeHighTemp"] == 0.0


def test_time_at_extreme_temperatures_is_counted_and_charging_separately() -> None:
    run = simulate("pulses", 600.0, seed=2, overrides={
        "protocol": protocol(1.0), "thermal": {"ambient_c": 50.0, "initial_temp_c": 50.0},
        "schedule": {"repeat": True, "segment": [
            {"kind": "constant", "c_rate": -0.5, "duration_s": 100.0},
            {"kind": "rest", "duration_s": 200.0}]}})
    fed = edge(health_interval_s=60.0)
    with structlog.testing.capture_logs():
        fed.feed(run.samples)
    info = fed.health[-1].body["temperatureInformation"]
    elapsed_h = (fed.health[-1].ts - run.samples[0].ts) / 3600.0
    assert info["timeExtremeHighTemp"] == pytest.approx(elapsed_h, rel=1e-3)
    # 100 s of charging in every 300 s; the health record at 540 s has seen two of them.
    assert info["timeExtremeHighTempCharging"] == pytest.approx(200.0 / 3600.0, rel=0.02)
    assert info["timeExtremeLowTemp"] == 0.0
    assert [e["type"] for e in fed.events()].count("temperature_high") == 1


CHILD = """
import pickle, sys
from gateway.config import EdgeSection
from gateway.edge.core import EdgeCore
from gateway.metrics import Metrics
from gateway.store.sqlite import SqliteStore

samples = pickle.load(open(sys.argv[1], "rb"))
store = SqliteStore(sys.argv[2], max_bytes=1 << 30, max_records=1 << 22)
core = EdgeCore(EdgeSection(telemetry_interval_s=5.0, health_interval_s=60.0), Metrics())
core.restore(store.checkpoints())
for start in range(0, len(samples), 50):
    records = core.process(samples[start:start + 50])
    store.commit(records, core.take_checkpoints())
    print(start, flush=True)
store.close()
print("done", flush=True)
"""


def test_lifetime_counters_continue_unchanged_across_a_sigkill(tmp_path: Path) -> None:
    """A process feeding the edge core into a real store is killed at random moments; each new
    one restores and is fed the whole stream again (what it already saw is skipped as out of
    time order). The final counters equal an uninterrupted run's, and no committed counter ever
    went backwards."""
    run = abuse_run(False, seconds=3000.0)
    stream = tmp_path / "samples.pickle"
    stream.write_bytes(pickle.dumps(run.samples))
    database = tmp_path / "store.sqlite"
    rng = np.random.default_rng(11)
    kills = 0
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(stream), str(database)],
                                 cwd=REPO, env=child_env(), stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        target = int(rng.integers(3, 40))
        for seen, line in enumerate(child.stdout, start=1):
            if line.strip() == "done":
                break
            if seen == target:
                child.send_signal(signal.SIGKILL)
                kills += 1
                break
        child.wait(timeout=120)
    finished = subprocess.run([sys.executable, "-c", CHILD, str(stream), str(database)],
                              cwd=REPO, env=child_env(), capture_output=True, text=True,
                              timeout=300, check=True)
    assert finished.stdout.strip().endswith("done")
    assert kills >= 1

    store = SqliteStore(database, max_bytes=1 << 30, max_records=1 << 22)
    killed = PackState.from_bytes(store.checkpoints()["edge/SIM-0001"], "SIM-0001")
    committed = store.lease(1 << 22)
    store.close()
    whole = EdgeCore(EdgeSection(telemetry_interval_s=5.0, health_interval_s=60.0), Metrics())
    with structlog.testing.capture_logs():
        whole.process(run.samples)
    expected = PackState.from_bytes(whole.take_checkpoints()["edge/SIM-0001"], "SIM-0001")
    np.testing.assert_array_equal(killed.totals, expected.totals)
    np.testing.assert_array_equal(killed.counters, expected.counters)
    # Every committed telemetry record's counters, in seq order, never decrease.
    telemetry = [r.body for r in committed if r.kind is RecordKind.TELEMETRY]
    series = [b["capacity_throughput_ah"] for b in telemetry]
    assert len(series) > 100
    assert all(b >= a for a, b in itertools.pairwise(series))
