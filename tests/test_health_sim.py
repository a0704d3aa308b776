"""Ground truth for the edge core's estimators: the firmware simulator, decoded by the gateway.

The helpers here run a :class:`firmware_sim.Simulator` through the gateway's own decode stage
(profile, :class:`PackAssembler`) into samples, keep the simulator's truth beside them, and feed
an :class:`EdgeCore`. The acceptance tests (tests/test_health_acceptance.py) use them; the tests in
this file check the plumbing itself against the truth.

Scenarios are the shipped ones with overrides (``overrides`` has the shape of the scenario TOML).
Most use few cells and only the simulated time a criterion needs; the capacity scenarios sample
every 5 s, which the simulator and decoder get through quickly, since a capacity update needs
hours of simulated time (a discharge or charge and a rest long enough to relax).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from firmware_sim import DEFAULT_START_TIME, Simulator
from gateway.config import EdgeSection
from gateway.decode.assembler import PackAssembler
from gateway.decode.profile import load_profile
from gateway.edge.core import EdgeCore
from gateway.metrics import Metrics
from gateway.model import Record, RecordKind, Sample
from gateway.sources.base import frame_from_message

REPO = Path(__file__).resolve().parent.parent
PROFILE = load_profile(REPO / "profiles" / "reference.toml")

#: Every period of the BMS protocol the tests may set at once.
_PERIODS = ("pack_status_period_s", "cell_stats_period_s", "cell_voltages_period_s",
            "cell_temps_period_s", "balancing_period_s", "identity_period_s", "info_period_s")


def protocol(sample_s: float, physics_s: float | None = None) -> dict[str, Any]:
    """Protocol overrides: pack values and cell voltages every ``sample_s``, the rest at most
    every 10 s; physics steps of ``physics_s`` (default: the sample period)."""
    out: dict[str, Any] = {name: max(sample_s, 10.0) for name in _PERIODS}
    out["pack_status_period_s"] = out["cell_voltages_period_s"] = sample_s
    out["cell_temps_period_s"] = max(sample_s, 1.0)
    out["physics_step_s"] = physics_s if physics_s is not None else sample_s
    return out


def pulse_schedule(rest_first_s: float = 30.0, rest_s: float = 15.0,
                   repeat: int = 1000) -> dict[str, Any]:
    """Current steps of ≥ 0.2 C both ways from a rest, each pulse 10 s, for resistance."""
    return {"repeat": False, "segment": [
        {"kind": "rest", "duration_s": rest_first_s},
        {"kind": "pulses", "c_rates": [1.0, -0.5, 0.5, 0.2, -0.2], "pulse_s": 10.0,
         "rest_s": rest_s, "repeat": repeat}]}


def pulse_overrides(*, sample_s: float = 0.1, physics_s: float | None = None, soc: float = 0.5,
                    temp_c: float = 25.0, rest_first_s: float = 30.0) -> dict[str, Any]:
    return {"protocol": protocol(sample_s, physics_s),
            "pack": {"initial_soc": soc, "initial_soc_spread": 0.002},
            "thermal": {"ambient_c": temp_c, "initial_temp_c": temp_c},
            "aging": {"acceleration": 0.0},
            "schedule": pulse_schedule(rest_first_s)}


def capacity_overrides(chemistry: str = "NMC", *, rest_s: float = 2000.0,
                       sample_s: float = 5.0) -> dict[str, Any]:
    """Cycles between two relaxed rests: 2 C down, 1 C up (NMC 0.25 ↔ 0.9; LFP 0.08 ↔ 0.97,
    where its OCV is steep enough to read an SOC from)."""
    low, high, down = (0.25, 0.9, 2.0) if chemistry == "NMC" else (0.08, 0.97, 2.0)
    return {"protocol": protocol(sample_s),
            "pack": {"chemistry": chemistry, "initial_soc": high, "initial_soc_spread": 0.005},
            "schedule": {"repeat": True, "segment": [
                {"kind": "rest", "duration_s": rest_s},
                {"kind": "constant", "c_rate": down, "until_soc_below": low},
                {"kind": "rest", "duration_s": rest_s},
                {"kind": "constant", "c_rate": -1.0, "until_soc_above": high}]}}


@dataclass
class SimRun:
    """A simulated run: the samples the gateway decoded, and the truth every ``truth_s``."""

    samples: list[Sample]
    truth: list[dict[str, Any]]
    sim: Simulator
    end_ts: float

    def truth_at(self, ts: float) -> dict[str, Any]:
        """The truth line nearest to ``ts`` (measurement time)."""
        return min(self.truth, key=lambda line: abs(line["ts"] - ts))


def simulate(scenario: str, seconds: float, *, cells: int = 2, sensors: int = 1, seed: int = 1,
             overrides: Mapping[str, Any] | None = None, start_time: float = DEFAULT_START_TIME,
             serial: str = "SIM-0001", truth_s: float = 10.0,
             change: Callable[[Simulator], None] | None = None) -> SimRun:
    """Run the simulator for ``seconds`` and decode its frames with the gateway's decode stage.

    ``change`` may alter the simulated pack before the first step (a weak cell).
    """
    sim = Simulator.from_scenario(scenario, cells=cells, sensors=sensors, seed=seed,
                                  serial=serial, start_time=start_time,
                                  overrides=dict(overrides or {}))
    if change is not None:
        change(sim)
    truth: list[dict[str, Any]] = []
    sim.add_truth_sink(truth.append, truth_s)
    assembler = PackAssembler(PROFILE, Metrics(), limits=EdgeSection())
    samples: list[Sample] = []
    with structlog.testing.capture_logs():  # the assembler's pack_seen lines are not news here
        for message in sim.messages(seconds):
            produced = assembler.feed(frame_from_message(message))
            if produced:
                samples.extend(produced)
        samples.extend(assembler.flush(math.inf))
    sim.finish_truth()
    return SimRun(samples, truth, sim, start_time + seconds)


def scale_cell(cell: int, *, capacity: float = 1.0, r0: float = 1.0,
               ) -> Callable[[Simulator], None]:
    """Make one simulated cell weaker: its capacity and/or ohmic resistance scaled.

    The simulator has no per-cell option for this; its pack keeps each cell's new capacity and
    resistance in arrays the physics reads every step, and its truth reports from them.
    """
    def change(sim: Simulator) -> None:
        pack = sim.packs[0]
        pack.q_new[cell] *= capacity
        pack.r0_new[cell] *= r0
    return change


@dataclass
class Fed:
    """An edge core fed in batches; its health records in order."""

    core: EdgeCore
    records: list[Record] = field(default_factory=list)

    def feed(self, samples: Sequence[Sample], batch: int = 200) -> list[Record]:
        out: list[Record] = []
        for start in range(0, len(samples), batch):
            out.extend(self.core.process(samples[start:start + batch]))
        for record in out:  # every body is strict JSON: no NaN, nothing that does not encode
            json.dumps(record.body, allow_nan=False)
        self.records.extend(out)
        return out

    @property
    def health(self) -> list[Record]:
        return [r for r in self.records if r.kind is RecordKind.HEALTH]

    def events(self) -> list[dict[str, Any]]:
        return [item for r in self.records if r.kind is RecordKind.EVENTS
                for item in r.body["events"]]


def edge(**settings: Any) -> Fed:
    base: dict[str, Any] = {"health_interval_s": 5.0, "telemetry_interval_s": 60.0}
    base.update(settings)
    return Fed(EdgeCore(EdgeSection(**base), Metrics()))


def first(records: Iterable[Record], predicate: Callable[[dict[str, Any]], bool],
          ) -> Record | None:
    return next((r for r in records if predicate(r.body)), None)


def p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 95))


def relative_errors(estimates: Sequence[float | None], truth: Sequence[float]) -> list[float]:
    return [abs(e / t - 1.0) if e is not None else math.inf
            for e, t in zip(estimates, truth, strict=True)]


# ---------------------------------------------------------------------------------------------
# The plumbing


def test_decoded_samples_follow_the_simulated_pack() -> None:
    run = simulate("pulses", 60.0, cells=3, overrides=pulse_overrides())
    assert 590 <= len(run.samples) <= 601  # 10 Hz
    sample = run.samples[-1]
    truth = run.truth_at(sample.ts)
    assert sample.serial == "SIM-0001" and sample.chemistry == "NMC"
    assert sample.rated_capacity_ah == 50.0
    assert sample.cell_voltages_v is not None
    # Measured through 1 mV noise and 1 mV steps; the truth is 0.1 s away at most.
    np.testing.assert_allclose(sample.cell_voltages_v, truth["voltage_v"], atol=0.01)


def test_a_scaled_cell_is_weaker_in_the_truth() -> None:
    run = simulate("pulses", 10.0, cells=3, overrides=pulse_overrides(),
                   change=scale_cell(1, capacity=0.9, r0=1.3))
    healthy = simulate("pulses", 10.0, cells=3, overrides=pulse_overrides())
    line, base = run.truth[-1], healthy.truth[-1]
    assert line["capacity_ah"][1] == pytest.approx(0.9 * base["capacity_ah"][1], rel=1e-6)
    assert line["r0_25c_ohm"][1] == pytest.approx(1.3 * base["r0_25c_ohm"][1], rel=1e-6)
    assert line["capacity_ah"][0] == base["capacity_ah"][0]
