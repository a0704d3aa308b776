"""The simulator: one pack (two with the duplicate-serial fault) on one bus, advanced in chunks
of simulated time.

The physics always advances in chunks of the same length (:data:`CHUNK_SECONDS`), whatever the
caller asks for, so every random stream is consumed identically and the same seed gives the same
frames byte for byte, whether the frames are written to a file in one go or streamed in real time
a few at a time. Frames are handed out up to the requested time; the rest of the chunk waits for
the next call.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import can
import numpy as np

from firmware_sim.faults import BusFaults, ValueFaults, Window
from firmware_sim.frames import FrameBatch
from firmware_sim.pack import Chunk, PackSim
from firmware_sim.protocol import Protocol, shared_protocol
from firmware_sim.scenario import DuplicateSerialFault, Scenario, deep_merge, load_scenario

#: 2026-01-01T00:00:00Z: the default start of trace files, fixed so that runs are reproducible
DEFAULT_START_TIME = 1_767_225_600.0
#: simulated seconds the physics advances per chunk (at least _MIN_CHUNK_STEPS steps)
CHUNK_SECONDS = 10.0
_MIN_CHUNK_STEPS = 100
_HISTORY_CHUNKS = 4

TruthSink = Callable[[dict[str, Any]], None]


class Simulator:
    """A BMS on a CAN bus. Build it with :meth:`from_scenario`."""

    def __init__(self, scenario: Scenario, *, seed: int = 1,
                 start_time: float = DEFAULT_START_TIME, protocol: Protocol | None = None) -> None:
        self.scenario = scenario
        self.seed = seed
        self.start_time = start_time
        self.start_us = round(start_time * 1e6)
        self.dt = scenario.protocol.physics_step_s
        self.dt_us = round(self.dt * 1e6)
        self.chunk_steps = max(_MIN_CHUNK_STEPS, round(CHUNK_SECONDS / self.dt))
        proto = protocol or shared_protocol()
        node = scenario.pack.node_id
        primary = PackSim(scenario, seed=seed, ordinal=0, node_id=node,
                          phase_s=scenario.protocol.phase_s, start_us=self.start_us,
                          protocol=proto, value_faults=ValueFaults(scenario.fault, self.dt))
        self.packs: list[PackSim] = [primary]
        self._windows: list[Window | None] = [None]
        for fault in scenario.fault:
            if isinstance(fault, DuplicateSerialFault):
                other = fault.node_id if fault.node_id is not None else (node + 1) % 16
                self.packs.append(PackSim(
                    scenario, seed=seed, ordinal=1, node_id=other,
                    phase_s=scenario.protocol.phase_s + fault.phase_s, start_us=self.start_us,
                    protocol=proto, value_faults=None))
                self._windows.append(Window.of(fault, self.dt))
        self._bus_faults = BusFaults(scenario.fault, self.dt, self.start_us, node, seed)
        self._next_k = 0  # first step not yet simulated
        self._history: deque[tuple[int, list[Chunk]]] = deque(maxlen=_HISTORY_CHUNKS)
        self._ready = FrameBatch.empty()  # final frames (before the horizon) not yet handed out
        self._carry = FrameBatch.empty()  # frames at or past the horizon, merged with the next
        self._horizon_us = self.start_us  # every frame before this is in _ready or handed out
        self._cursor_us = self.start_us  # frames before this have been handed out
        self._last_step = 0
        self._sinks: list[list[Any]] = []  # [sink, interval in steps, next step due]
        # truth() may be called from another thread than the one streaming frames
        self._lock = threading.RLock()

    @classmethod
    def from_scenario(cls, scenario: str | Path | Scenario, *, cells: int | None = None,
                      sensors: int | None = None, serial: str | None = None, seed: int = 1,
                      node_id: int | None = None, start_time: float = DEFAULT_START_TIME,
                      chemistry: str | None = None, rated_capacity_ah: float | None = None,
                      overrides: Mapping[str, Any] | None = None) -> Simulator:
        """A simulator for a shipped scenario name, a scenario file, or a loaded scenario.

        The keyword arguments override the scenario's ``[pack]`` table; ``overrides`` is merged
        over the whole scenario (same shape as the TOML). A loaded :class:`Scenario` is used as
        it is.
        """
        if isinstance(scenario, Scenario):
            loaded = scenario
        else:
            pack: dict[str, Any] = {
                key: value for key, value in (
                    ("cells", cells), ("sensors", sensors), ("serial", serial),
                    ("node_id", node_id), ("chemistry", chemistry),
                    ("rated_capacity_ah", rated_capacity_ah)) if value is not None}
            merged: dict[str, Any] = {"pack": pack} if pack else {}
            if overrides:
                merged = deep_merge(merged, overrides)
            loaded = load_scenario(scenario, merged)
        return cls(loaded, seed=seed, start_time=start_time)

    # ------------------------------------------------------------------------------- time

    @property
    def time_s(self) -> float:
        """Simulated seconds handed out so far: the end of the last span asked of
        :meth:`batches` or :meth:`messages` (or of the chunk being handed out)."""
        return (self._cursor_us - self.start_us) / 1e6

    # ------------------------------------------------------------------------------- generation

    def _generate_locked(self) -> None:
        k0, n = self._next_k, self.chunk_steps
        chunks = [pack.advance(k0, n) for pack in self.packs]
        batches = []
        for pack, chunk, window in zip(self.packs, chunks, self._windows, strict=True):
            frames = pack.frames(chunk)
            batches.append(frames if window is None else frames.take(window.mask(frames.step)))
        merged = self._bus_faults.apply(FrameBatch.concat(batches), k0, k0 + n)
        merged = FrameBatch.concat([self._carry, merged]) if len(self._carry) else merged
        self._history.append((k0, chunks))
        self._next_k = k0 + n
        self._horizon_us = self.start_us + self._next_k * self.dt_us
        cut = int(np.searchsorted(merged.t_us, self._horizon_us, side="left"))
        head = merged.take(slice(0, cut))
        self._ready = FrameBatch.concat([self._ready, head]) if len(self._ready) else head
        self._carry = merged.take(slice(cut, None))

    def _chunk_of(self, k: int) -> tuple[list[Chunk], int]:
        with self._lock:
            while k >= self._next_k:
                self._generate_locked()
            for k0, chunks in self._history:
                if k0 <= k < k0 + self.chunk_steps:
                    return chunks, k - k0
        raise LookupError(f"step {k} is no longer held (oldest kept: {self._history[0][0]})")

    def batches(self, seconds: float | None = None) -> Iterator[FrameBatch]:
        """Frames of the next ``seconds`` of simulated time (None: for ever), in time order, as
        column batches (the fast path for trace writers)."""
        end_us = None if seconds is None else self._cursor_us + round(seconds * 1e6)
        while end_us is None or self._cursor_us < end_us:
            with self._lock:
                if self._horizon_us <= self._cursor_us:
                    self._generate_locked()
                    continue
                limit = self._horizon_us if end_us is None else min(self._horizon_us, end_us)
                cut = int(np.searchsorted(self._ready.t_us, limit, side="left"))
                out = self._ready.take(slice(0, cut))
                self._ready = self._ready.take(slice(cut, None))
                self._emit_truth(self._cursor_us, limit)
                self._cursor_us = limit
                if len(out):
                    self._last_step = int(out.step[-1])
            if len(out):
                yield out

    def messages(self, seconds: float | None = None, channel: str | None = None,
                 ) -> Iterator[can.Message]:
        """``can.Message`` of the next ``seconds`` of simulated time (None: for ever); the
        timestamp is ``start_time`` + simulated time."""
        for batch in self.batches(seconds):
            steps = batch.step.tolist()
            for step, msg in zip(steps, batch.messages(channel), strict=True):
                self._last_step = step
                yield msg

    # ------------------------------------------------------------------------------- truth

    def truth(self, pack: int = 0) -> dict[str, Any]:
        """Ground truth at the physics step of the frame handed out last (``pack`` 1 is the
        duplicate-serial pack). Safe to call from another thread than the one streaming."""
        chunks, row = self._chunk_of(self._last_step)
        return self.packs[pack].truth(chunks[pack], row)

    def add_truth_sink(self, sink: TruthSink, interval_s: float | None = None) -> None:
        """Call ``sink`` with the truth of every pack at each multiple of ``interval_s``
        (default: the scenario's ``truth.interval_s``) as frames up to that time are handed
        out; call :meth:`finish_truth` at the end of a run for the instant at its end."""
        interval = interval_s if interval_s is not None else self.scenario.truth.interval_s
        steps = max(1, round(interval / self.dt))
        first = -(-self._step_at(self._cursor_us) // steps) * steps
        self._sinks.append([sink, steps, first])

    def _step_at(self, t_us: int) -> int:
        return (t_us - self.start_us) // self.dt_us

    def _emit_truth(self, lo_us: int, hi_us: int, inclusive: bool = False) -> None:
        for entry in self._sinks:
            sink, steps, due = entry
            while True:
                t_us = self.start_us + due * self.dt_us
                if t_us < lo_us:  # already behind the frames handed out: not a truth to tell
                    due += steps
                    continue
                if t_us > hi_us or (t_us == hi_us and not inclusive):
                    break
                chunks, row = self._chunk_of(due)
                for pack, chunk in zip(self.packs, chunks, strict=True):
                    sink(pack.truth(chunk, row))
                due += steps
            entry[2] = due

    def finish_truth(self) -> None:
        """Emit a truth instant that falls exactly at the end of the time handed out."""
        self._emit_truth(self._cursor_us, self._cursor_us, inclusive=True)
