"""End to end: ``firmware_sim`` writes a trace and its truth, ``bms-gateway replay --fast --out``
turns the trace into records, and the health records meet the acceptance figures (one seed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import REPO, child_env, gateway_config, simulate

CYCLING = """\
# Capacity cycles sampled every 5 s: 2 C down to 25 %, 1 C up to 90 %, relaxed rests between.
[scenario]
base = "cycling"

[protocol]
physics_step_s = 5.0
pack_status_period_s = 5.0
cell_voltages_period_s = 5.0
cell_stats_period_s = 10.0
cell_temps_period_s = 10.0
balancing_period_s = 10.0
identity_period_s = 10.0
info_period_s = 10.0

[pack]
initial_soc = 0.9

[schedule]
repeat = true

[[schedule.segment]]
kind = "rest"
duration_s = 2000.0

[[schedule.segment]]
kind = "constant"
c_rate = 2.0
until_soc_below = 0.25

[[schedule.segment]]
kind = "rest"
duration_s = 2000.0

[[schedule.segment]]
kind = "constant"
c_rate = -1.0
until_soc_above = 0.9
"""


def replay(tmp_path: Path, scenario: str, seconds: float, cells: int,
           edge: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Health records of the replayed trace, and the truth lines."""
    trace, truth = tmp_path / "trace.log", tmp_path / "truth.jsonl"
    simulate(["--scenario", scenario, "--seconds", str(seconds), "--cells", str(cells),
              "--seed", "7", "--out", str(trace), "--truth", str(truth)])
    config = gateway_config(tmp_path, broker_port=1883, source={"kind": "replay"},
                            edge={"telemetry_interval_s": 60.0, "health_interval_s": 60.0,
                                  **edge})
    out = tmp_path / "records.jsonl"
    done = subprocess.run([sys.executable, "-m", "gateway", "replay", "-c", str(config),
                           "--fast", "--out", str(out), str(trace)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    health = [record for line in out.read_text().splitlines()
              for envelope in [json.loads(line)] if envelope["kind"] == "health"
              for record in envelope["records"]]
    truths = [json.loads(line) for line in truth.read_text().splitlines()]
    assert health and truths
    return health, truths


def truth_at(truths: list[dict[str, Any]], iso: str) -> dict[str, Any]:
    from datetime import datetime

    ts = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    return min(truths, key=lambda line: abs(line["ts"] - ts))


def test_replay_of_a_pulses_trace_gives_r0_within_3_percent_after_20_steps(
        tmp_path: Path) -> None:
    # The shipped pulses scenario, 10 Hz, 4 cells: pulse trains at 90 % and 70 % SOC (its
    # 0.2 C steps are at the threshold: about half of them are accepted).
    health, truths = replay(tmp_path, "pulses", 4800.0, 4, {})
    record = next(r for r in health if r.get("r0_steps", 0) >= 20)
    truth = truth_at(truths, record["lastUpdate"])["r0_25c_ohm"]
    errors = [abs(r / t - 1.0) for r, t in zip(record["r0_25c_ohm"]["cells"], truth,
                                                strict=True)]
    print(f"\nACCEPTANCE replay_pulses_r0 worst={100 * max(errors):.3f}%")
    assert max(errors) <= 0.03
    assert record["r0ActivationEnergySource"] == "configured"  # one temperature only


def test_replay_of_a_cycling_trace_gives_capacity_within_2_and_1_5_percent(
        tmp_path: Path) -> None:
    scenario = tmp_path / "cycling-5s.toml"
    scenario.write_text(CYCLING)
    health, truths = replay(tmp_path, str(scenario), 80_000.0, 4, {"ocv_rest_s": 1800.0})
    for updates, limit in ((10, 0.02), (20, 0.015)):
        record = next(r for r in health if r.get("capacity_ah", {}).get("updates", 0) >= updates)
        truth = truth_at(truths, record["lastUpdate"])["capacity_ah"]
        errors = [abs(q / t - 1.0) for q, t in zip(record["capacity_ah"]["cells"], truth,
                                                    strict=True)]
        errors.append(abs(record["remainingCapacity"] / min(truth) - 1.0))
        print(f"\nACCEPTANCE replay_cycling_capacity_{updates} worst={100 * max(errors):.3f}%")
        assert max(errors) <= limit
        assert record["stateOfHealth"] == pytest.approx(
            100.0 * record["remainingCapacity"] / record["ratedCapacity"], abs=0.01)
    last = health[-1]
    # The passport counters against the simulator's integrals (default sensor errors).
    truth = truth_at(truths, last["lastUpdate"])
    assert last["capacityThroughput"] == pytest.approx(truth["ah_throughput"], rel=0.005)
    assert last["numberOfFullCycles"] == pytest.approx(truth["efc"], rel=0.005)
