"""Live output: a python-can virtual bus in process, SLCAN over a pseudo-terminal read by
python-can's own ``slcan`` interface (pyserial), the command in live mode, SocketCAN/vcan."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import can
import pytest

from firmware_sim import Simulator
from firmware_sim.live import SlcanPty, run_on_bus
from firmware_sim.readback import read_back

REPO = Path(__file__).resolve().parent.parent


def receive(bus: can.BusABC, count: int, timeout: float = 20.0) -> list[can.Message]:
    got: list[can.Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        msg = bus.recv(0.2)
        if msg is not None:
            got.append(msg)
    return got


def frames(messages: list[can.Message]) -> list[tuple[int, bytes]]:
    return [(m.arbitration_id, bytes(m.data)) for m in messages]


def test_run_on_virtual_bus_as_fast_as_possible() -> None:
    channel = f"sim-{uuid.uuid4().hex}"
    expected = list(Simulator.from_scenario("nominal", cells=4, seed=3).messages(5.0))
    with can.Bus(interface="virtual", channel=channel) as tx, \
            can.Bus(interface="virtual", channel=channel) as rx:
        stats = run_on_bus(Simulator.from_scenario("nominal", cells=4, seed=3), tx,
                           seconds=5.0, speed=0.0)
        got = receive(rx, len(expected))
    assert stats.sent == len(expected) and stats.failed == 0
    assert frames(got) == frames(expected)
    assert stats.simulated_s == pytest.approx(expected[-1].timestamp - expected[0].timestamp)


def test_real_time_pacing_and_stop() -> None:
    channel = f"sim-{uuid.uuid4().hex}"
    sim = Simulator.from_scenario("nominal", cells=4, seed=3, start_time=time.time())
    stop = threading.Event()
    result: list[Any] = []
    with can.Bus(interface="virtual", channel=channel) as tx, \
            can.Bus(interface="virtual", channel=channel, preserve_timestamps=True) as rx:
        thread = threading.Thread(target=lambda: result.append(
            run_on_bus(sim, tx, stop=stop, seconds=None, speed=1.0)))
        began = time.monotonic()
        thread.start()
        first = receive(rx, 1, timeout=5.0)
        time.sleep(1.0)
        stop.set()
        thread.join(timeout=5.0)
        elapsed = time.monotonic() - began
        rest = receive(rx, 10_000, timeout=0.5)
    assert not thread.is_alive()
    stats = result[0]
    # paced: about one simulated second per wall second, not the whole run at once
    assert 0.5 < stats.simulated_s <= elapsed + 0.2
    assert len(first) + len(rest) == stats.sent
    per_second = 40  # 4 cells: 10 × (status, stats, 2 voltage blocks) + temps, balancing, ...
    assert stats.sent < per_second * (elapsed + 1.5)
    # a running simulator always knows its truth
    assert sim.truth()["t"] == pytest.approx(stats.simulated_s, abs=0.2)


def test_nominal_runs_on_indefinitely() -> None:
    periods = {f"{name}_period_s": 10.0 for name in (
        "pack_status", "cell_stats", "cell_voltages", "cell_temps", "balancing", "identity",
        "info")}
    sim = Simulator.from_scenario("nominal", cells=2, sensors=1, overrides={
        "protocol": {"physics_step_s": 1.0, **periods}})
    states: dict[int, set[str]] = {0: set(), 1: set(), 2: set()}
    rows: list[dict[str, Any]] = []
    sim.add_truth_sink(rows.append, 600)
    for msg in sim.messages(None):  # for ever: stop after two and a half days
        if msg.timestamp - sim.start_time > 2.5 * 86400:
            break
    for r in rows:
        states[int(r["t"] // 86400)].add(r["state"])
    assert states[0] == states[1] == {"drive", "standby", "charge"}
    day1 = [r["state"] for r in rows if r["t"] < 86400]
    day2 = [r["state"] for r in rows if 86400 <= r["t"] < 2 * 86400]
    assert day1[:3] == day2[:3] == ["drive"] * 3  # each day opens with the morning drive


def test_slcan_pty_with_python_can_slcan() -> None:
    expected = list(Simulator.from_scenario("nominal", cells=5, seed=2).messages(3.0))
    with SlcanPty() as port:
        bus = can.Bus(interface="slcan", channel=port.path, bitrate=500000,
                      sleep_after_open=0)
        try:
            assert bus.get_version(2.0) == (10, 13)
            deadline = time.monotonic() + 5
            while not port.is_open and time.monotonic() < deadline:
                time.sleep(0.01)
            assert port.is_open
            stats = run_on_bus(Simulator.from_scenario("nominal", cells=5, seed=2,
                                                       overrides={"fault": [
                                                           {"kind": "error_frames",
                                                            "rate_hz": 3.0}]}),
                               port, seconds=3.0, speed=0.0)
            got = receive(bus, len(expected))
        finally:
            bus.shutdown()
        assert frames(got) == frames(expected)
        assert port.not_representable > 0  # error frames: SLCAN cannot carry them
        assert stats.sent == len(expected) + port.not_representable
        # the client closed the channel on shutdown: the adapter stops sending
        deadline = time.monotonic() + 5
        while port.is_open and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not port.is_open
        port.send(expected[0])
        assert port.dropped_closed == 1


def test_command_speaks_slcan_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "--slcan-pty", "--scenario", "pulses",
         "--cells", "7", "--serial", "SLCAN-PACK", "--speed", "4"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("SLCAN /dev/")
        bus = can.Bus(interface="slcan", channel=line.split(" ", 1)[1], bitrate=500000,
                      sleep_after_open=0)
        try:
            got = receive(bus, 150)
        finally:
            bus.shutdown()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    back = read_back(got)
    assert len(got) == 150 and not back.undecodable and not back.unknown
    assert back.serial() == "SLCAN-PACK"
    assert back.of("BMS_Info")[0].signals["CellCount"] == 7
    stamps = [m.timestamp for m in got]
    assert stamps[-1] - stamps[0] < 15  # 150 frames ≈ 2.5 simulated s, at 4 × real time


def vcan_channel() -> str:
    channel = os.environ.get("VCAN_CHANNEL", "vcan0")
    if not hasattr(socket, "AF_CAN"):
        pytest.skip("this Python has no AF_CAN")
    try:
        socket.if_nametoindex(channel)
    except OSError:
        pytest.skip(f"no CAN interface {channel} (the vcan test setup creates it)")
    return channel


@pytest.mark.vcan
def test_run_on_socketcan_vcan() -> None:
    channel = vcan_channel()
    expected = list(Simulator.from_scenario("nominal", cells=6).messages(2.0))
    with can.Bus(interface="socketcan", channel=channel) as rx, \
            can.Bus(interface="socketcan", channel=channel) as tx:
        stats = run_on_bus(Simulator.from_scenario("nominal", cells=6), tx, seconds=2.0,
                           speed=0.0)
        got = receive(rx, len(expected), timeout=10.0)
    assert stats.failed == 0 and stats.sent == len(expected)
    assert frames(got) == frames(expected)


def test_messages_continue_where_the_last_call_stopped() -> None:
    whole = list(Simulator.from_scenario("pulses", cells=3).messages(12.0))
    sim = Simulator.from_scenario("pulses", cells=3)
    parts = list(itertools.chain(sim.messages(0.35), sim.messages(7.0), sim.messages(4.65)))
    assert frames(parts) == frames(whole)
    assert [m.timestamp for m in parts] == [m.timestamp for m in whole]
