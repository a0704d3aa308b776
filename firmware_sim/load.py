"""The load: a schedule of segments (rest, constant current, pulse trains, drive cycles, CC-CV
charge) turned into what the physics kernel needs for a run of steps.

The :class:`Sequencer` owns the position in the schedule. For each run it hands out the demanded
current per step and the segment vector (charger voltage limit, stop conditions, pack state); the
kernel reports how many steps it executed and why it returned, and the sequencer moves on when a
segment is done. A protection trip abandons the running segment, holds the contactors open
until the fault clears, then carries on with the next segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from firmware_sim import physics as ph
from firmware_sim.chemistry import Chemistry
from firmware_sim.scenario import (
    ChargeSegment,
    ConstantSegment,
    DriveSegment,
    PulsesSegment,
    RestSegment,
    Scenario,
    ScenarioError,
    Segment,
)

FloatArray = npt.NDArray[np.float64]

#: steps of an open-ended segment (rest for ever, constant until a condition): never reached
_OPEN_ENDED = 1 << 62


@dataclass(frozen=True, slots=True)
class Run:
    """What the kernel runs next: at most ``steps`` steps of ``demand`` under ``seg``."""

    steps: int
    demand: FloatArray
    seg: FloatArray


def _seg_vector(state: int, *, cv: float = math.nan, stop_min_v: float | None = None,
                stop_max_v: float | None = None, stop_taper_a: float | None = None,
                stop_soc_below: float | None = None, stop_soc_above: float | None = None,
                fault_hold: bool = False) -> FloatArray:
    seg = np.full(ph.N_SEG, math.nan)
    seg[ph.S_CV] = cv
    for index, value in ((ph.S_STOP_MIN_V, stop_min_v), (ph.S_STOP_MAX_V, stop_max_v),
                         (ph.S_STOP_TAPER_A, stop_taper_a), (ph.S_STOP_SOC_BELOW, stop_soc_below),
                         (ph.S_STOP_SOC_ABOVE, stop_soc_above)):
        if value is not None:
            seg[index] = value
    seg[ph.S_STATE] = state
    seg[ph.S_FAULT_HOLD] = 1.0 if fault_hold else 0.0
    return seg


def drive_profile(steps: int, dt: float, seg: DriveSegment, rated_ah: float,
                  rng: np.random.Generator) -> FloatArray:
    """A synthetic drive cycle: trips of idle, acceleration, cruise and braking.

    A speed trace at 1 s resolution drives a road-load model of a 1.8 t car (inertia, rolling
    resistance, aerodynamic drag, 500 W auxiliaries, regeneration at 60 %); the resulting power
    is scaled so that the mean current is ``mean_c`` and clipped to ``peak_c`` discharge and
    ``regen_c`` charge. Only the shape is physical; the scale is set by the segment.
    """
    seconds = math.ceil(steps * dt) + 2
    speed = np.zeros(seconds)
    t = 0
    while t < seconds:
        t += int(rng.integers(5, 40))  # idle at a stop
        target = rng.uniform(8.0, 30.0)  # m/s, 30–110 km/h
        v = 0.0
        accel = rng.uniform(0.8, 2.0)
        while v < target and t < seconds:
            v = min(target, v + accel)
            speed[t] = v
            t += 1
        cruise_end = t + int(rng.integers(30, 300))
        while t < min(cruise_end, seconds):
            v = max(2.0, v + rng.normal(0.0, 0.4) + 0.05 * (target - v))
            speed[t] = v
            t += 1
        decel = rng.uniform(1.0, 3.0)
        while v > 0.0 and t < seconds:
            v = max(0.0, v - decel)
            speed[t] = v
            t += 1
    mass, g, crr, cda, rho = 1800.0, 9.81, 0.01, 0.7, 1.2
    accel_trace = np.gradient(speed)
    wheel = mass * accel_trace * speed + crr * mass * g * speed * (speed > 0) \
        + 0.5 * rho * cda * speed ** 3
    power = np.where(wheel > 0, wheel / 0.9, wheel * 0.6) + 500.0
    # to the physics step, linear between the 1 s points
    fine = np.interp(np.arange(steps) * dt, np.arange(seconds, dtype=np.float64), power)
    peak, regen, mean = seg.peak_c * rated_ah, seg.regen_c * rated_ah, seg.mean_c * rated_ah
    current = fine / max(float(np.mean(fine)), 1e-9) * mean
    for _ in range(4):  # clipping moves the mean; a few rescalings settle it
        current = np.clip(current, -regen, peak)
        current *= mean / max(float(np.mean(current)), 1e-9)
    result: FloatArray = np.clip(current, -regen, peak)
    return result


class Sequencer:
    """Walks the schedule; one per pack."""

    def __init__(self, scenario: Scenario, chem: Chemistry, seed_seq: np.random.SeedSequence,
                 ) -> None:
        self._segments = scenario.schedule.segment
        self._repeat = scenario.schedule.repeat
        self._dt = scenario.protocol.physics_step_s
        self._rated = scenario.pack.rated_capacity_ah
        self._chem = chem
        self._seed_seq = seed_seq
        self._index = 0  # segment within the pass
        self._pass = 0
        self._pass_start = 0  # global step at which this pass began
        self._elapsed = 0  # steps executed in the current segment
        self._current: tuple[int, FloatArray | None, FloatArray] | None = None
        self._holding = False
        self._idle_streak = 0
        #: set when the last step run ended a CC-CV charge by its taper (the pack is full)
        self.charge_completed = False

    @property
    def _finished(self) -> bool:
        return not self._segments or (not self._repeat and self._pass > 0)

    def _steps(self, seconds: float | None) -> int:
        return _OPEN_ENDED if seconds is None else round(seconds / self._dt)

    def _until(self, until_schedule_s: float | None, k: int) -> int:
        if until_schedule_s is None:
            return _OPEN_ENDED
        return max(0, round(until_schedule_s / self._dt) - (k - self._pass_start))

    def _start(self, seg: Segment, k: int) -> tuple[int, FloatArray | None, FloatArray]:
        """(total steps, demand pattern or None for constant, segment vector) of a segment."""
        rated = self._rated
        if isinstance(seg, RestSegment):
            total = min(self._steps(seg.duration_s), self._until(seg.until_schedule_s, k))
            return total, None, _seg_vector(ph.STANDBY)
        if isinstance(seg, ConstantSegment):
            amps = seg.current_a if seg.current_a is not None else (seg.c_rate or 0.0) * rated
            state = ph.DRIVE if amps > 0 else ph.CHARGE if amps < 0 else ph.STANDBY
            total = min(self._steps(seg.duration_s), self._until(seg.until_schedule_s, k))
            stop_min_v = seg.until_min_cell_v
            if seg.until_cutoff:
                cutoff = self._chem.discharge_cutoff_v
                stop_min_v = cutoff if stop_min_v is None else max(stop_min_v, cutoff)
            vec = _seg_vector(state, stop_min_v=stop_min_v,
                              stop_max_v=seg.until_max_cell_v, stop_soc_below=seg.until_soc_below,
                              stop_soc_above=seg.until_soc_above)
            return total, np.array([amps]), vec
        if isinstance(seg, PulsesSegment):
            pulse, rest = round(seg.pulse_s / self._dt), round(seg.rest_s / self._dt)
            one = np.concatenate([np.concatenate([np.full(pulse, c * rated), np.zeros(rest)])
                                  for c in seg.c_rates])
            pattern = np.tile(one, seg.repeat)
            return len(pattern), pattern, _seg_vector(ph.DRIVE)
        if isinstance(seg, DriveSegment):
            steps = round(seg.duration_s / self._dt)
            rng = np.random.default_rng(self._seed_seq.spawn(1)[0])
            pattern = drive_profile(steps, self._dt, seg, rated, rng)
            vec = _seg_vector(ph.DRIVE, stop_min_v=seg.until_min_cell_v,
                              stop_soc_below=seg.until_soc_below)
            return steps, pattern, vec
        assert isinstance(seg, ChargeSegment)
        cv = seg.cv_cell_v if seg.cv_cell_v is not None else self._chem.charge_cv_v
        total = min(self._steps(seg.duration_s), self._until(seg.until_schedule_s, k))
        vec = _seg_vector(ph.CHARGE, cv=cv, stop_taper_a=seg.taper_c * rated)
        return total, np.array([-seg.c_rate * rated]), vec

    def next_run(self, k: int, max_steps: int) -> Run:
        """The next run of at most ``max_steps`` steps starting at global step ``k``."""
        if self._holding:
            return Run(max_steps, np.zeros(max_steps), _seg_vector(ph.FAULT, fault_hold=True))
        if self._finished:
            return Run(max_steps, np.zeros(max_steps), _seg_vector(ph.STANDBY))
        if self._current is None:
            self._current = self._start(self._segments[self._index], k)
            self._elapsed = 0
        total, pattern, vec = self._current
        steps = min(max_steps, total - self._elapsed)
        if pattern is None:
            demand = np.zeros(steps)
        elif len(pattern) == 1:
            demand = np.full(steps, pattern[0])
        else:
            demand = pattern[self._elapsed:self._elapsed + steps]
        return Run(steps, demand, vec)

    def advanced(self, k_next: int, steps: int, reason: int) -> None:
        """Account a kernel run of ``steps`` steps that returned ``reason``; ``k_next`` is the
        first step not yet executed."""
        self.charge_completed = False
        if self._holding:
            if reason == ph.CLEARED:
                self._holding = False
            return
        if self._finished:
            return
        self._idle_streak = 0 if steps else self._idle_streak + 1
        if self._idle_streak > 2 * len(self._segments) + 2:
            raise ScenarioError("the schedule makes no progress: every segment ends at once")
        assert self._current is not None
        total, _, vec = self._current
        self._elapsed += steps
        if reason == ph.TRIPPED:
            self._holding = True
            self._next_segment(k_next)
        elif reason == ph.STOPPED or self._elapsed >= total:
            if reason == ph.STOPPED and not math.isnan(vec[ph.S_STOP_TAPER_A]):
                self.charge_completed = True
            self._next_segment(k_next)

    def _next_segment(self, k: int) -> None:
        self._current = None
        self._index += 1
        if self._index >= len(self._segments):
            self._index = 0
            self._pass += 1
            self._pass_start = k
