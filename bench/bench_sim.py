"""Simulator speed: simulated seconds per wall second, writing trace files.

    .venv/bin/python bench/bench_sim.py            # the full table (about a minute)
    .venv/bin/python bench/bench_sim.py --quick    # shorter runs

The target row is "nominal, 96 cells, 1 h → candump .log": one simulated hour of a 96-cell pack
at the default periods (≈ 1.25 M frames) in ≤ 18 s, i.e. ≥ 200 × real time. The baseline row
does the same work the plain way (cantools ``encode_message`` and python-can's candump writer,
one frame at a time) on a slice of the same traffic and is extrapolated to the same hour.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import can

from firmware_sim import Simulator
from firmware_sim.protocol import BASE_IDS, shared_protocol
from firmware_sim.readback import read_back
from firmware_sim.traces import TraceWriter

TARGET_WALL_S = 18.0


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    sim_s: float
    wall_s: float
    cpu_s: float
    frames: int

    def cells(self) -> list[str]:
        return [self.name, f"{self.sim_s:,.0f}", f"{self.wall_s:.2f}", f"{self.cpu_s:.2f}",
                f"{self.sim_s / self.wall_s:,.0f}×", f"{self.frames:,}",
                f"{self.frames / self.wall_s / 1e3:,.0f}"]


def measure(name: str, sim_s: float, work: Callable[[], int]) -> Row:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    frames = work()
    return Row(name, sim_s, time.perf_counter() - wall0, time.process_time() - cpu0, frames)


def trace(scenario: str, cells: int, seconds: float, path: Path) -> Callable[[], int]:
    def work() -> int:
        sim = Simulator.from_scenario(scenario, cells=cells, seed=1)
        with TraceWriter(path) as writer:
            for batch in sim.batches(seconds):
                writer.write(batch)
        return writer.frames
    return work


def messages(cells: int, seconds: float) -> Callable[[], int]:
    def work() -> int:
        return sum(1 for _ in Simulator.from_scenario("nominal", cells=cells).messages(seconds))
    return work


def baseline(cells: int, seconds: float, path: Path) -> Callable[[], int]:
    """cantools encode + python-can's CanutilsLogWriter, one frame at a time, for the values
    the simulator decoded back (so the encoder does the same work)."""
    source = list(Simulator.from_scenario("nominal", cells=cells).messages(seconds))
    decoded = read_back(source)
    db = shared_protocol().db
    work_items = []
    for (name, node), frames in decoded.frames.items():
        message = db.get_message_by_name(name)
        work_items.extend((f.ts, message, BASE_IDS[name] + node, f.signals) for f in frames)
    work_items.sort(key=lambda item: item[0])

    def work() -> int:
        writer = can.CanutilsLogWriter(str(path), channel="can0")
        for ts, message, frame_id, signals in work_items:
            data = message.encode(signals, strict=False)
            writer.on_message_received(can.Message(timestamp=ts, arbitration_id=frame_id,
                                                   is_extended_id=False, data=data))
        writer.stop()
        return len(work_items)
    return work


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    hour = 600.0 if args.quick else 3600.0
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # load the DBC and the cached numba kernels once, outside the timings
        start = measure("warm-up (DBC, numba cache)", 1.0, trace("nominal", 4, 1.0,
                                                                  folder / "w.log"))
        target = measure(f"nominal, 96 cells, {hour / 3600:g} h → candump .log", hour,
                         trace("nominal", 96, hour, folder / "t.log"))
        rows.append(target)
        for cells in (16, 256):
            rows.append(measure(f"nominal, {cells} cells, {hour / 3600:g} h → .log", hour,
                                trace("nominal", cells, hour, folder / f"c{cells}.log")))
        rows.append(measure(f"cycling, 96 cells, {hour / 3600:g} h → .log", hour,
                            trace("cycling", 96, hour, folder / "cy.log")))
        rows.append(measure("nominal, 96 cells, 60 s → can.Message", 60.0, messages(96, 60.0)))
        for suffix in (".asc", ".blf"):
            rows.append(measure(f"nominal, 96 cells, 60 s → {suffix}", 60.0,
                                trace("nominal", 96, 60.0, folder / f"t{suffix}")))
        plain = measure("baseline: cantools + python-can writer, 96 cells, 60 s", 60.0,
                        baseline(96, 60.0, folder / "b.log"))
        rows.append(plain)
    header = ["run", "simulated s", "wall s", "CPU s", "sim s / wall s", "frames",
              "k frames/s"]
    table = [header, ["---"] * len(header)] + [row.cells() for row in rows]
    for line in table:
        print("| " + " | ".join(line) + " |")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scaled = target.wall_s * 3600.0 / hour
    baseline_hour = plain.wall_s / plain.frames * target.frames * 3600.0 / hour
    print(f"\nwarm-up {start.wall_s:.2f} s; peak RSS {rss_mb:.0f} MB")
    print(f"1 h of 96 cells → candump: {scaled:.2f} s ({3600.0 / scaled:,.0f}× real time; "
          f"target ≤ {TARGET_WALL_S:.0f} s: {'met' if scaled <= TARGET_WALL_S else 'MISSED'}); "
          f"the plain way would take ≈ {baseline_hour:.0f} s")
    return 0 if scaled <= TARGET_WALL_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
