"""The whole pipeline over a ~1,000,000-frame candump trace, against a plain baseline.

    .venv/bin/python bench/bench_pipeline.py                 # 96 cells, ~1 M frames
    .venv/bin/python bench/bench_pipeline.py --frames 200000 # quicker

The trace is written once by the firmware simulator (cached under var/bench/). Each row runs in a
child process of its own, so CPU seconds and peak RSS are that run's alone:

- baseline: python-can ``LogReader`` + cantools ``decode_message`` of every frame, nothing else;
- pipeline → mqtt: ``bms-gateway replay --fast`` with a real SQLite store, publishing to a private
  mosquitto; timed until the process exits, i.e. until every record is committed *and* acked;
- pipeline → jsonl: ``bms-gateway replay --fast --out``, the same pipeline writing envelopes to a
  file instead of a broker.

Target (foundation issue): the pipeline → mqtt row at ≥ 0.5× the baseline's frames/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.broker import Broker  # noqa: E402
from tests.support.daemon import gateway_config  # noqa: E402

BASELINE = """
import sys, can, cantools
db = cantools.database.load_file(sys.argv[1])
n = 0
for msg in can.LogReader(sys.argv[2]):
    try:
        db.decode_message(msg.arbitration_id, msg.data)
    except (KeyError, ValueError):
        pass
    n += 1
print(n)
"""

#: frames the simulator sends per simulated second for N cells at the default periods (measured
#: from the trace itself; used only to size the trace before it exists)
def _frames_per_second(cells: int, sensors: int) -> float:
    return 10 * (2 + -(-cells // 3)) + (-(-sensors // 6)) + -(-cells // 56) + 3 + 1


def make_trace(frames: int, cells: int, sensors: int) -> Path:
    seconds = int(frames / _frames_per_second(cells, sensors)) + 1
    folder = REPO / "var" / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    trace = folder / f"pipeline-{cells}c-{seconds}s.log"
    partial = folder / f"partial-{trace.name}"
    if not trace.exists():
        print(f"writing {trace.name} ({seconds} simulated s) with firmware_sim …", flush=True)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "firmware_sim", "--scenario", "nominal",
                        "--seconds", str(seconds), "--cells", str(cells), "--sensors",
                        str(sensors), "--seed", "1", "--serial", "BENCH-0001",
                        "--out", str(partial)], check=True, cwd=REPO)
        os.replace(partial, trace)
        print(f"  done in {time.monotonic() - started:.1f} s", flush=True)
    return trace


def run_child(argv: list[str]) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds, peak RSS (MiB) and stdout of one child process (its own
    resource usage, from wait4)."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
        return (wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                out.read().decode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--cells", type=int, default=96)
    parser.add_argument("--sensors", type=int, default=16)
    args = parser.parse_args()
    trace = make_trace(args.frames, args.cells, args.sensors)
    dbc = REPO / "dbc" / "bms_reference.dbc"
    rows = []

    wall, cpu, rss, out = run_child([sys.executable, "-c", BASELINE, str(dbc), str(trace)])
    frames = int(out.strip())
    rows.append(("baseline: LogReader + cantools decode", wall, cpu, rss))

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        with Broker(tmp / "broker") as broker:
            config = gateway_config(tmp, broker_port=broker.port, source={"kind": "bus"},
                                    edge={"telemetry_interval_s": 1.0,
                                          "health_interval_s": 60.0},
                                    mqtt={"publish_interval_s": 1.0})
            quiet = config.read_text().replace('log_format = "json"',
                                               'log_format = "json"\nlog_level = "warning"')
            config.write_text(quiet)
            wall, cpu, rss, _ = run_child([sys.executable, "-m", "gateway", "replay", "-c",
                                           str(config), "--fast", str(trace)])
            rows.append(("pipeline → SQLite → mqtt", wall, cpu, rss))
            stats = json.loads(subprocess.run(
                [sys.executable, "-m", "gateway", "status", "-c", str(config), "--json"],
                capture_output=True, text=True, cwd=REPO, check=True).stdout)
        out_file = tmp / "records.jsonl"
        wall, cpu, rss, _ = run_child([sys.executable, "-m", "gateway", "replay", "-c",
                                       str(config), "--fast", "--out", str(out_file), str(trace)])
        rows.append(("pipeline → jsonl", wall, cpu, rss))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base_fps = frames / rows[0][1]
    print(f"\n{frames:,} frames, {args.cells} cells, trace {trace.name}; "
          f"records committed {stats['records_committed_total']}, "
          f"acked {stats['records_acked_total']}, left in store {stats['store_records']}\n")
    print(f"| {'run':<38} | {'frames/s':>9} | {'× baseline':>10} | {'CPU s / M frames':>16} | "
          f"{'peak RSS MiB':>12} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 12}|{'-' * 18}|{'-' * 14}|")
    for name, wall, cpu, rss in rows:
        fps = frames / wall
        print(f"| {name:<38} | {fps:>9,.0f} | {fps / base_fps:>10.2f} | "
              f"{cpu / frames * 1e6:>16.1f} | {rss:>12.0f} |")


if __name__ == "__main__":
    main()
