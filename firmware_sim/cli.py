"""``python -m firmware_sim``: write a trace file, or play the BMS live on a bus or an SLCAN
pseudo-terminal.

Exit codes: 0 done or stopped by SIGTERM/SIGINT; 2 bad usage; 78 a bad scenario (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import can

from firmware_sim.live import SlcanPty, run_on_bus
from firmware_sim.scenario import ScenarioError, shipped_scenarios
from firmware_sim.simulator import DEFAULT_START_TIME, Simulator
from firmware_sim.traces import TRACE_SUFFIXES, TraceWriter, TruthWriter

EX_CONFIG = 78


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m firmware_sim",
        description="A simulated BMS speaking the reference protocol (dbc/bms_reference.dbc).")
    p.add_argument("--scenario", default="nominal",
                   help=f"shipped scenario ({', '.join(shipped_scenarios())}) or a TOML path")
    p.add_argument("--seconds", type=float, help="simulated seconds (live: default for ever)")
    p.add_argument("--cells", type=int, help="cells in series (1–256)")
    p.add_argument("--sensors", type=int, help="temperature sensors (1–64)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--serial", help="the pack's serial number")
    p.add_argument("--node-id", type=int, help="node id 0–15, added to every frame id")
    p.add_argument("--chemistry", choices=("NMC", "LFP"))
    p.add_argument("--capacity-ah", type=float, help="rated capacity")
    p.add_argument("--start-time", type=float,
                   help="POSIX time of simulated time 0 (default: 2026-01-01T00:00:00Z for "
                        "trace files, now for live runs)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path,
                     help=f"trace file; format from the suffix ({', '.join(TRACE_SUFFIXES)})")
    out.add_argument("--interface", help="python-can interface for a live bus (virtual, "
                                         "socketcan, ...); with --channel")
    out.add_argument("--slcan-pty", action="store_true",
                     help="play an SLCAN adapter on a pseudo-terminal; prints 'SLCAN <path>'")
    p.add_argument("--channel", help="live bus channel, or the channel named in a .log trace")
    p.add_argument("--bitrate", type=int, help="live bus bitrate, where the interface needs it")
    p.add_argument("--truth", type=Path, help="write ground truth as JSON lines")
    p.add_argument("--truth-interval", type=float,
                   help="simulated seconds between truth lines (default: the scenario's)")
    p.add_argument("--speed", type=float,
                   help="1 real time, 0 as fast as possible (default: 0 for --out, 1 live)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    live = args.out is None
    if not live and args.seconds is None:
        parser.error("--out needs --seconds")
    if args.interface and not args.channel:
        parser.error("--interface needs --channel")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be > 0")
    speed = args.speed if args.speed is not None else (1.0 if live else 0.0)
    if speed < 0:
        parser.error("--speed must be ≥ 0")
    start = args.start_time if args.start_time is not None else (
        time.time() if live else DEFAULT_START_TIME)
    try:
        sim = Simulator.from_scenario(
            args.scenario, cells=args.cells, sensors=args.sensors, serial=args.serial,
            seed=args.seed, node_id=args.node_id, start_time=start, chemistry=args.chemistry,
            rated_capacity_ah=args.capacity_ah)
    except ScenarioError as exc:
        print(f"firmware_sim: {exc}", file=sys.stderr)
        return EX_CONFIG

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    truth = TruthWriter(args.truth) if args.truth else None
    if truth is not None:
        sim.add_truth_sink(truth, args.truth_interval)
    wall0 = time.monotonic()
    try:
        if not live:
            frames = _write_trace(sim, args.out, args.channel or sim.scenario.protocol.channel,
                                  args.seconds, speed, stop)
            what = f"{frames} frames to {args.out}; {sim.time_s:.1f} simulated s"
        elif args.slcan_pty:
            with SlcanPty() as port:
                print(f"SLCAN {port.path}", flush=True)
                stats = run_on_bus(sim, port, stop, args.seconds, speed)
                what = (f"{stats.sent} frames over SLCAN ({port.dropped_closed} while closed, "
                        f"{port.dropped_full} unread, {port.not_representable} error frames); "
                        f"{stats.simulated_s:.1f} simulated s")
        else:
            kwargs = {"bitrate": args.bitrate} if args.bitrate else {}
            with can.Bus(interface=args.interface, channel=args.channel, **kwargs) as bus:
                stats = run_on_bus(sim, bus, stop, args.seconds, speed)
                what = f"{stats.sent} frames to {args.interface}:{args.channel} " \
                       f"({stats.failed} refused); {stats.simulated_s:.1f} simulated s"
        if truth is not None:
            sim.finish_truth()
    finally:
        if truth is not None:
            truth.close()
    wall = time.monotonic() - wall0
    print(f"firmware_sim: {what} in {wall:.2f} s", file=sys.stderr)
    return 0


def _write_trace(sim: Simulator, path: Path, channel: str, seconds: float, speed: float,
                 stop: threading.Event) -> int:
    wall0 = time.monotonic()
    with TraceWriter(path, channel) as writer:
        for batch in sim.batches(seconds):
            writer.write(batch)
            if stop.is_set():
                break
            if speed > 0:
                delay = wall0 + sim.time_s / speed - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
        return writer.frames
